"""The Ray reporter (the trainer's logging seam inside a sweep) and the NaN-safe searcher,
exercised without a Ray cluster."""

import math
from pathlib import Path

import optuna
import pytest
import torch

from sweep.searcher import SweepSearcher
from sweep.sweep_config import ConstraintSpec
from sweep.trainable import (PROGRESS_FILE, MissingMetricError, RayReporter, TrialDiverged,
                             record_to_metrics)
from trainer import MetricsRecord, make_sae_config, TensorSource, TrainingConfig, build_sae, train_sae


def test_reporter_reports_every_record_with_its_checkpoint_and_flags_the_last(tmp_path):
    torch.manual_seed(0)
    acts = torch.randn(2048, 8)
    calls = []
    reporter = RayReporter(monitored=("fvu", "l0"), max_tokens=1024, node_id="n1",
                           node_ip="1.2.3.4",
                           report_fn=lambda m, c: calls.append((m, c)))
    sae = build_sae(make_sae_config(d_in=8, d_sae=16, top_k=2, calibration_tokens=256))
    cfg = TrainingConfig(max_tokens=1024, train_batch_tokens=128, log_freq=2, checkpoint_every=4,
                         lr_warmup_steps=0, show_progress=False, init_tokens=256,
                         eval_max_tokens=256)
    result = train_sae(sae, TensorSource(acts), cfg, val_source=TensorSource(acts[:256]),
                       out_dir=tmp_path / "out", reporter=reporter)
    steps = [m["step"] for m, _ in calls]
    assert steps == [2, 4, 6, 8] and result.steps == 8
    assert [m["final"] for m, _ in calls] == [False, False, False, True]
    # checkpoints travel with the report at the checkpoint steps (4 and 8 = the final one)
    assert [c is not None for _, c in calls] == [False, True, False, True]
    last, ckpt = calls[-1]
    assert Path(ckpt, "weights.safetensors").exists() and Path(ckpt, PROGRESS_FILE).exists()
    assert last["node_id"] == "n1" and last["tokens_seen"] == 1024
    assert last["l0"] > 0 and last["l0_train"] > 0
    assert "lr" not in last and "lr_current" in last and last["train_seconds"] > 0
    assert all(math.isfinite(last[k]) for k in ("fvu", "l0", "explained_variance"))


def test_non_finite_objective_is_divergence_and_missing_metric_is_an_error():
    reporter = RayReporter(monitored=("fvu",), report_fn=lambda m, c: pytest.fail("reported"))
    with pytest.raises(TrialDiverged, match="fvu is nan at step 5"):
        reporter.report({"step": 5, "fvu": float("nan")}, None, final=False)
    # an intermediate report may lack it (a two-phase trial before its fine-tune); the final
    # one may not
    sent = []
    RayReporter(monitored=("ce_loss_delta",), report_fn=lambda m, c: sent.append(m)).report(
        {"step": 1, "fvu": 0.1}, None, final=False)
    assert sent and "ce_loss_delta" not in sent[0]
    with pytest.raises(MissingMetricError, match="ce_loss_delta"):
        RayReporter(monitored=("ce_loss_delta",)).report({"step": 1, "fvu": 0.1}, None,
                                                         final=True)


def test_record_to_metrics_renames_and_derives():
    rec = MetricsRecord(step=3, tokens_seen=30, lr=1e-3, l0=7.5, l0_train=8.0, fvu=0.5,
                        elapsed_s=2.0, loss_terms={"mse": 0.1})
    m = record_to_metrics(rec)
    assert m["lr_current"] == 1e-3 and m["l0"] == 7.5 and m["train_seconds"] == 2.0
    assert m["loss/mse"] == 0.1 and "lr" not in m and "elapsed_s" not in m


def _space(trial):
    trial.suggest_float("x", 0.0, 1.0)


def _searcher(tmp_path, metric, mode, constraints=()):
    space = _space
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    s = SweepSearcher(space=space, metric=metric, mode=mode, storage=storage, study_name="t",
                      sampler=optuna.samplers.RandomSampler(seed=0), constraints=constraints)
    return s, storage


def test_searcher_never_tells_optuna_a_nan(tmp_path):
    s, _ = _searcher(tmp_path, "fvu", "min", [ConstraintSpec(metric="l0", max=10.0)])
    for tid in "abcd":
        s.suggest(tid)
    s.on_trial_result("a", {"fvu": float("nan"), "training_iteration": 1})  # ignored, no raise
    s.on_trial_complete("a", {"fvu": float("nan"), "l0": 3.0})
    s.on_trial_complete("b", {"fvu": 0.2, "l0": 12.0})
    s.on_trial_complete("c", None, error=True)
    s.on_trial_complete("d", {"fvu": 0.3, "l0": 4.0})
    trials = s._ot_study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert states == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert trials[1].values == [0.2] and trials[1].constraints == {"l0 <= 10.0": 2.0}
    assert trials[3].constraints == {"l0 <= 10.0": -6.0}


def test_searcher_pareto_and_orphans(tmp_path):
    s, storage = _searcher(tmp_path, ["fvu", "l0"], ["min", "min"])
    s.suggest("a")
    s.suggest("b")
    s.on_trial_complete("a", {"fvu": 0.2, "l0": 5.0})
    # a previous driver asked Optuna for a trial Ray never recorded
    orphan = s._ot_study.ask()
    assert s.fail_orphans() == 1
    numbers = {t.number: t.state.name for t in s._ot_study.get_trials(deepcopy=False)}
    assert numbers[orphan.number] == "FAIL" and numbers[1] == "RUNNING"  # "b" is live
    assert s._ot_study.get_trials(deepcopy=False)[0].values == [0.2, 5.0]


def test_searcher_tolerates_a_trial_finished_before_a_driver_crash(tmp_path):
    s, _ = _searcher(tmp_path, "fvu", "min", [ConstraintSpec(metric="l0", max=10.0)])
    s.suggest("a")
    s.on_trial_complete("a", {"fvu": 0.2, "l0": 3.0})
    s._completed_trials.clear()  # the restored searcher state predates that completion
    s.on_trial_result("a", {"fvu": 0.25, "training_iteration": 3})
    s.on_trial_complete("a", {"fvu": 0.25, "l0": 30.0})
    trial = s._ot_study.get_trials(deepcopy=False)[0]
    assert trial.state.name == "COMPLETE" and trial.values == [0.2]
    assert trial.constraints == {"l0 <= 10.0": -7.0}
