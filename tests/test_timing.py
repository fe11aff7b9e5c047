"""Where a run's wall time goes: the phase timer, the loop's phases, the trial's time columns
and the sweep summary's training share."""

import json
import math

import pandas as pd
import pytest
import torch

from sweep.results import SLOT_COLUMN, RESULTS_FILE
from sweep.summary import summarize_sweep, training_share, training_share_text
from sweep.trainable import PROGRESS_FILE, RayReporter, _times_at
from trainer import (PhaseTimer, TensorSource, TrainingConfig, active_timer, build_sae,
                     make_sae_config, time_columns, timed_phase, train_sae)

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def tick(self, seconds):
        self.now += seconds


def test_phases_are_exclusive_and_sum_with_other_to_the_wall_time():
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    clock.tick(2)                        # 2 s in no phase
    with timer.phase("train"):
        clock.tick(10)                   # train 10
        with timer.phase("eval_val"):
            clock.tick(3)                # eval_val 3, train paused
            with timer.phase("checkpoint"):
                clock.tick(1)            # checkpoint 1, eval_val paused
            clock.tick(0.5)              # eval_val 3.5
        clock.tick(4)                    # train 14
        with timer.phase("train"):       # re-entering the same phase: no double count
            clock.tick(1)                # train 15
    with timer.phase("eval_test"):
        clock.tick(2)
    clock.tick(0.25)
    cols = timer.columns()
    assert cols == {"time_train_s": 15.0, "time_eval_val_s": 3.5, "time_checkpoint_s": 1.0,
                    "time_eval_test_s": 2.0, "time_eval_s": 5.5, "time_other_s": 2.25,
                    "time_wall_s": 23.75}
    phases = [v for k, v in cols.items() if k not in ("time_eval_s", "time_other_s",
                                                       "time_wall_s")]
    assert math.isclose(sum(phases) + cols["time_other_s"], cols["time_wall_s"])


def test_an_open_phase_counts_up_to_now_and_restore_carries_an_earlier_attempt():
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    with timer.phase("train"):
        clock.tick(5)
        assert timer.columns()["time_train_s"] == 5.0  # mid-phase report (Ray's reports are)
        with timer.phase("report"):
            clock.tick(1)
            snap = timer.columns()
            assert snap["time_train_s"] == 5.0 and snap["time_report_s"] == 1.0
    again = PhaseTimer(clock=clock)
    again.restore(timer.columns())
    with again.phase("train"):
        clock.tick(2)
    cols = again.columns()
    assert cols["time_train_s"] == 7.0 and cols["time_report_s"] == 1.0
    assert cols["time_wall_s"] == 6.0 + 2.0


def test_timed_phase_uses_the_active_timer_and_is_a_no_op_without_one():
    assert active_timer() is None
    with timed_phase("train"):  # no timer: nothing happens
        pass
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    with timer.activate():
        assert active_timer() is timer
        with timed_phase("eval_probe"):  # a new kind of evaluation: its own column by name
            clock.tick(4)
    assert active_timer() is None
    assert timer.columns()["time_eval_probe_s"] == 4.0 and timer.columns()["time_eval_s"] == 4.0
    with pytest.raises(ValueError, match="phase name"):
        timer.add("Bad Name", 1.0)


def test_time_columns_never_report_a_wall_time_below_the_phases():
    cols = time_columns({"train": 3.0, "startup": 2.0}, 4.0)  # e.g. a coarser clock
    assert cols["time_wall_s"] == 5.0 and cols["time_other_s"] == 0.0


def _train_timed(tmp_path, **cfg_overrides):
    torch.manual_seed(0)
    acts = torch.randn(2048, 8)
    reports = []
    reporter = RayReporter(monitored=("fvu",), max_tokens=1024,
                           report_fn=lambda m, c: reports.append((m, c)))
    sae = build_sae(make_sae_config(d_in=8, d_sae=16, top_k=2, calibration_tokens=256))
    cfg = TrainingConfig(max_tokens=1024, train_batch_tokens=128, log_freq=2, checkpoint_every=4,
                         lr_warmup_steps=0, show_progress=False, init_tokens=256,
                         eval_max_tokens=256, **cfg_overrides)
    timer = PhaseTimer()
    with timer.activate():
        train_sae(sae, TensorSource(acts), cfg, val_source=TensorSource(acts[:256]),
                  out_dir=tmp_path / "out", reporter=reporter)
    return timer, reports


def test_the_training_loop_times_its_phases_and_the_reports_carry_them(tmp_path):
    timer, reports = _train_timed(tmp_path)
    cols = timer.columns()
    for phase in ("startup", "train", "eval_val", "calibration", "checkpoint", "report"):
        assert cols[f"time_{phase}_s"] > 0, phase
    assert "time_finetune_s" not in cols  # a local run has no fine-tune steps
    phases = sum(v for k, v in cols.items()
                 if k not in ("time_eval_s", "time_other_s", "time_wall_s"))
    assert cols["time_wall_s"] >= phases - 1e-9
    assert math.isclose(phases + cols["time_other_s"], cols["time_wall_s"], rel_tol=1e-9)
    # every report carries the columns so far, growing; the checkpoint stores them for a restart
    walls = [m["time_wall_s"] for m, _ in reports]
    assert walls == sorted(walls) and all(m["time_train_s"] > 0 for m, _ in reports)
    last, ckpt = reports[-1]
    stored = json.loads((tmp_path / "out" / "checkpoints").joinpath(
        sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())[-1],
        PROGRESS_FILE).read_text())
    assert stored["times"]["time_train_s"] == last["time_train_s"]
    assert _times_at(ckpt) == stored["times"]


def test_without_an_active_timer_reports_carry_no_time_columns(tmp_path):
    torch.manual_seed(0)
    reports = []
    reporter = RayReporter(monitored=("fvu",), report_fn=lambda m, c: reports.append(m))
    sae = build_sae(make_sae_config(d_in=8, d_sae=16, top_k=2, calibration_tokens=256))
    cfg = TrainingConfig(max_tokens=512, train_batch_tokens=128, log_freq=2, show_progress=False,
                         init_tokens=256, eval_max_tokens=256, checkpoint_every=None)
    acts = torch.randn(1024, 8)
    train_sae(sae, TensorSource(acts), cfg, val_source=TensorSource(acts[:256]),
              reporter=reporter)
    assert reports and not any(k.startswith("time_") for m in reports for k in m)


def _frame(rows):
    return pd.DataFrame(rows)


def test_training_share_is_training_steps_over_slot_time():
    frame = _frame([
        # slot time known (the driver's): 40 + 5 of 60
        {"trial_id": "a", "status": "completed", "time_train_s": 40.0, "time_finetune_s": 5.0,
         "time_eval_s": 8.0, "time_wall_s": 55.0, SLOT_COLUMN: 60.0},
        # no slot time (an earlier driver ran it): its own wall time, 20 of 30
        {"trial_id": "b", "status": "completed", "time_train_s": 20.0, "time_finetune_s": None,
         "time_eval_s": 4.0, "time_wall_s": 30.0, SLOT_COLUMN: None},
        # no time columns at all (failed before its first report): left out
        {"trial_id": "c", "status": "failed", "time_train_s": None, "time_finetune_s": None,
         "time_eval_s": None, "time_wall_s": None, SLOT_COLUMN: None},
    ])
    share, trained, total, n = training_share(frame)
    assert (trained, total, n) == (65.0, 90.0, 2)
    assert math.isclose(share, 65.0 / 90.0)
    text = training_share_text(frame)
    assert text.startswith("72% of the trials' slot time in training steps (65 s of 90 s, "
                           "2 trials")
    # a sweep from before the time columns: no line
    assert training_share(_frame([{"trial_id": "x", "status": "completed", "fvu": 0.1}])) is None


def test_the_sweep_summary_states_the_training_share(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "sweep.json").write_text(json.dumps({"config": {
        "objective": {"metric": "fvu", "mode": "min", "constraints": []},
        "search_space": {"d_sae": {}}}}))
    pd.DataFrame([
        {"trial_id": "t1", "status": "completed", "error": None, "d_sae": 64, "fvu": 0.2,
         "l0": 8.0, "time_train_s": 30.0, "time_finetune_s": 6.0, "time_wall_s": 42.0,
         SLOT_COLUMN: 45.0, "step": 10, "tokens_seen": 100, "train_seconds": 40.0},
        {"trial_id": "t2", "status": "completed", "error": None, "d_sae": 128, "fvu": 0.1,
         "l0": 9.0, "time_train_s": 45.0, "time_finetune_s": 9.0, "time_wall_s": 52.0,
         SLOT_COLUMN: 55.0, "step": 10, "tokens_seen": 100, "train_seconds": 50.0},
    ]).to_parquet(exp / RESULTS_FILE)
    text = summarize_sweep(exp)
    # (30 + 6 + 45 + 9) / (45 + 55) = 90 %
    assert "time: 90% of the trials' slot time in training steps (90 s of 100 s, 2 trials" in text
