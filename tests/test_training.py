"""The training loop: learning, bit-for-bit resume, checkpoints, reporting, errors, metrics."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from trainer import (CheckpointMismatchError, ConsoleReporter, DimensionMismatchError, TokenBatch,
                     LocalObjective, NonFiniteActivationError, Objective, make_sae_config, StepOutput,
                     TensorSource, TrainingConfig, TrainingDivergedError, build_sae, load_sae,
                     train_sae)
from trainer.metrics import MetricsRecord, ReconstructionAccumulator, density_summary
from trainer.training import Schedule

D_IN, D_SAE = 16, 64


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_data(n: int, seed: int = 0, n_feat: int = 32) -> torch.Tensor:
    """Tokens that are 3-sparse combinations of a fixed random dictionary, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_feat, D_IN, generator=torch.Generator().manual_seed(123))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_feat, generator=g).argsort(1)[:, :3]
    codes = torch.zeros(n, n_feat).scatter_(1, idx, torch.rand(n, 3, generator=g) * 4 + 1)
    return codes @ dictionary + 2.0 + 0.01 * torch.randn(n, D_IN, generator=g)


class ListReporter:
    def __init__(self, stop_at_checkpoint_step=None):
        self.records, self.checkpoints, self.messages, self.steps = [], [], [], []
        self.stop_at = stop_at_checkpoint_step

    def on_train_start(self, *, total_steps, start_step, description):
        self.total, self.start = total_steps, start_step

    def on_step(self, step):
        self.steps.append(step)

    def on_metrics(self, record, checkpoint_dir):
        self.records.append(record)
        if checkpoint_dir:
            self.checkpoints.append(checkpoint_dir)
            if record.step == self.stop_at:
                raise KeyboardInterrupt  # a kill right after the checkpoint was written

    def on_message(self, text):
        self.messages.append(text)

    def on_train_end(self, result):
        self.result = result


def quiet(**kw) -> TrainingConfig:
    base = dict(num_epochs=2, train_batch_tokens=128, lr=1e-2, log_freq=8, show_progress=False,
                checkpoint_every=None)
    base.update(kw)
    return TrainingConfig(**base)


def tiny_sae(**kw):
    """A tiny BatchTopK config (its threshold EMA starts early, as these short runs need),
    or another architecture's when ``architecture`` is given."""
    if kw.get("architecture", "batchtopk") == "batchtopk":
        kw.setdefault("threshold_warmup_steps", 4)
    return make_sae_config(d_in=D_IN, d_sae=D_SAE, **kw)


@pytest.mark.parametrize("arch", ["batchtopk", "standard"])
def test_training_learns_the_sparse_dictionary(arch, tmp_path):
    extra = {"top_k": 3} if arch == "batchtopk" else {"l1_coefficient": 0.003}
    sae = build_sae(tiny_sae(architecture=arch, **extra), seed=0)
    rep = ListReporter()
    result = train_sae(sae, TensorSource(sparse_data(4096)), quiet(num_epochs=3),
                       val_source=TensorSource(sparse_data(1024, seed=1)), reporter=rep,
                       out_dir=tmp_path)
    first, final = rep.records[0], result.final
    assert final.explained_variance > 0.65
    assert final.explained_variance > first.explained_variance
    assert final.fvu == pytest.approx(1 - final.explained_variance)
    assert result.steps == 3 * 32 and result.tokens_seen == 3 * 4096
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5)
    if arch == "batchtopk":
        assert final.l0_train == pytest.approx(3.0)
        # calibrated on training tokens; measured on the held-out validation tokens, which
        # the calibration never saw, the shipped L0 is k within 10 %
        assert final.l0 == pytest.approx(3.0, rel=0.10) and final.l0 != 3.0
        assert final.threshold is not None and final.threshold > 0
        assert final.fvu_train is not None  # the batch-level figure, for diagnosis
    assert sum(final.density_histogram) == round((1 - final.dead_fraction) * D_SAE)
    # the saved SAE (folded) reproduces the trained one on raw inputs
    loaded = load_sae(tmp_path / "final").eval()
    sae.eval()
    x = sparse_data(64, seed=5)
    assert torch.allclose(loaded(x)[0], sae(x)[0], rtol=1e-4, atol=1e-4)
    best = max(result.history, key=lambda r: r.explained_variance)
    assert (result.best_step, result.best_value) == (best.step, best.explained_variance)
    best_history = json.loads((tmp_path / "best" / "history.json").read_text())
    assert best_history[-1]["step"] == best.step  # saved when it was the best so far


def test_threshold_starts_after_its_warm_up():
    tc = quiet(num_epochs=1, log_freq=4)
    result = train_sae(build_sae(tiny_sae(top_k=3, threshold_warmup_steps=6,
                                          calibrate_threshold=False), seed=0),
                       TensorSource(sparse_data(2048)), tc, reporter=ListReporter())
    # 16 steps; the EMA is updated from the 7th step on
    assert [(r.step, r.threshold is None) for r in result.history] == [
        (4, True), (8, False), (12, False), (16, False)]
    capped = tiny_sae(top_k=3, threshold_warmup_steps=1000, calibrate_threshold=False)
    result = train_sae(build_sae(capped, seed=0), TensorSource(sparse_data(2048)), tc,
                       reporter=ListReporter())
    assert result.history[-1].threshold is not None  # warm-up capped at half the run


def _state(out_dir):
    from trainer.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(out_dir)
    return (load_file(str(ckpt / "weights.safetensors")),
            load_file(str(ckpt / "trainer_state.safetensors")), ckpt)


def test_resume_is_bit_for_bit(tmp_path):
    cfg = tiny_sae(top_k=3, top_k_aux=4, n_batches_to_dead=2, threshold_warmup_steps=5)
    tc = quiet(num_epochs=2, checkpoint_every=12, log_freq=6)
    train, val = TensorSource(sparse_data(2048)), TensorSource(sparse_data(512, seed=1))
    # 2N... straight through (N = 12 of 32 steps: mid-epoch, with AuxK and the threshold active)
    straight = train_sae(build_sae(cfg, seed=0), train, tc, val_source=val,
                         out_dir=tmp_path / "a", reporter=ListReporter())
    # killed right after the step-12 checkpoint, then resumed with fresh objects
    with pytest.raises(KeyboardInterrupt):
        train_sae(build_sae(cfg, seed=0), train, tc, val_source=val, out_dir=tmp_path / "b",
                  reporter=ListReporter(stop_at_checkpoint_step=12))
    from trainer.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_00000012"
    rep = ListReporter()
    resumed = train_sae(build_sae(cfg, seed=99), train, tc, val_source=val,
                        out_dir=tmp_path / "b", resume_from=ckpt, reporter=rep)
    assert rep.start == 12 and rep.steps[0] == 13
    assert resumed.steps == straight.steps == 32
    assert resumed.tokens_seen == straight.tokens_seen
    w_a, s_a, _ = _state(tmp_path / "a")
    w_b, s_b, _ = _state(tmp_path / "b")
    assert set(w_a) == set(w_b) and set(s_a) == set(s_b)
    for name in w_a:  # weights, threshold, dead counters, input scale
        assert torch.equal(w_a[name], w_b[name]), name
    for name in s_a:  # Adam moments and steps, RNG
        assert torch.equal(s_a[name], s_b[name]), name
    assert any(r.loss_terms["aux"] > 0 for r in straight.history)  # AuxK was active
    assert float(w_a["threshold"]) > 0
    for a, b in zip(straight.history, resumed.history):
        assert a.step == b.step and a.explained_variance == b.explained_variance
        assert a.loss == b.loss and a.threshold == b.threshold
    assert len(straight.history) == len(resumed.history)


def test_the_first_loss_window_after_a_ctrl_c_resume_is_whole(tmp_path):
    import signal

    class CtrlC(ListReporter):
        def on_step(self, step):
            super().on_step(step)
            if step == 15:  # between two reports (log_freq 6): the window holds steps 13-15
                signal.raise_signal(signal.SIGINT)

    cfg = tiny_sae(top_k=3)
    tc = quiet(num_epochs=2, log_freq=6, checkpoint_every=12)
    train, val = TensorSource(sparse_data(2048)), TensorSource(sparse_data(512, seed=1))
    straight = train_sae(build_sae(cfg, seed=0), train, tc, val_source=val,
                         out_dir=tmp_path / "a", reporter=ListReporter())
    with pytest.raises(KeyboardInterrupt):
        train_sae(build_sae(cfg, seed=0), train, tc, val_source=val, out_dir=tmp_path / "b",
                  reporter=CtrlC())
    from trainer.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_00000015"    # the Ctrl-C checkpoint, mid-window
    resumed = train_sae(build_sae(cfg, seed=1), train, tc, val_source=val,
                        out_dir=tmp_path / "b", resume_from=ckpt, reporter=ListReporter())
    first = next(r for r in resumed.history if r.step > 15)
    same = next(r for r in straight.history if r.step == first.step)
    assert first.step == 18 and first.loss == same.loss    # steps 13-18, as without the Ctrl-C
    assert first.loss_terms == same.loss_terms


def test_resuming_a_finished_run_does_nothing(tmp_path):
    cfg = tiny_sae(top_k=3)
    tc = quiet(num_epochs=1)
    first = train_sae(build_sae(cfg, seed=0), TensorSource(sparse_data(512)), tc,
                      out_dir=tmp_path, reporter=ListReporter())
    from trainer.checkpoint import latest_checkpoint
    rep = ListReporter()
    again = train_sae(build_sae(cfg, seed=1), TensorSource(sparse_data(512)), tc,
                      out_dir=tmp_path, resume_from=latest_checkpoint(tmp_path), reporter=rep)
    assert rep.result is again and rep.steps == [] and "already finished" in rep.messages[-1]
    assert again.steps == first.steps
    assert torch.equal(again.sae.W_enc, first.sae.W_enc)
    assert len(again.history) == len(first.history)


def test_checkpoint_from_another_config_names_the_fields(tmp_path):
    cfg = tiny_sae(top_k=3)
    tc = quiet(num_epochs=1, checkpoint_every=4)
    train = TensorSource(sparse_data(512))
    train_sae(build_sae(cfg, seed=0), train, tc, out_dir=tmp_path, reporter=ListReporter())
    from trainer.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"lr \(checkpoint: 0.01, now: 0.02\)"):
        train_sae(build_sae(cfg, seed=0), train, tc.replace(lr=0.02), resume_from=ckpt,
                  reporter=ListReporter())
    with pytest.raises(CheckpointMismatchError, match=r"d_sae \(checkpoint: 64, now: 32\)"):
        train_sae(build_sae(cfg.replace(d_sae=32), seed=0), train, tc, resume_from=ckpt,
                  reporter=ListReporter())
    # fields that do not change the math may differ
    train_sae(build_sae(cfg, seed=0), train, tc.replace(log_freq=3), resume_from=ckpt,
              reporter=ListReporter())
    with pytest.raises(CheckpointMismatchError, match="not a complete checkpoint"):
        train_sae(build_sae(cfg, seed=0), train, tc, resume_from=tmp_path / "final",
                  reporter=ListReporter())
    (ckpt / "trainer_state.json").write_text("{truncated")
    with pytest.raises(CheckpointMismatchError, match="trainer_state.json: not valid JSON"):
        train_sae(build_sae(cfg, seed=0), train, tc, resume_from=ckpt, reporter=ListReporter())


def test_reporter_gets_every_record_and_checkpoint_and_old_ones_are_pruned(tmp_path):
    tc = quiet(num_epochs=1, checkpoint_every=4, log_freq=3, keep_checkpoints=2)
    rep = ListReporter()
    result = train_sae(build_sae(tiny_sae(top_k=3), seed=0),
                       TensorSource(sparse_data(1280)), tc, out_dir=tmp_path, reporter=rep)
    # 10 steps: evaluations at 3, 4 (checkpoint), 6, 8 (checkpoint), 9 and the final one (10)
    assert [r.step for r in rep.records] == [3, 4, 6, 8, 9, 10]
    assert [c.rsplit("/", 1)[-1] for c in rep.checkpoints] == [
        "step_00000004", "step_00000008", "step_00000010"]
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert remaining == ["step_00000008", "step_00000010"]  # keep_checkpoints=2, no temp dirs
    assert [r.step for r in result.history] == [3, 4, 6, 8, 9, 10]
    assert rep.result is result
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step_00000010").iterdir()) == [
        ".sae-sweep-output.json", "config.json", "trainer_state.json",
        "trainer_state.safetensors", "weights.safetensors"]


def test_max_tokens_stops_training():
    tc = quiet(num_epochs=10, max_tokens=1000)
    result = train_sae(build_sae(tiny_sae(top_k=3), seed=0),
                       TensorSource(sparse_data(512)), tc, reporter=ListReporter())
    assert result.steps == math.ceil(1000 / 128) and result.tokens_seen == 1024


def test_nan_activations_stop_with_the_step_number_before_training_on_them():
    x = sparse_data(1024)
    x[3 * 128 + 5, 2] = float("nan")  # in the 4th batch (no shuffling)
    sae = build_sae(tiny_sae(top_k=3), seed=0)
    snapshots = []

    class Spy(ListReporter):
        def on_step(self, step):
            snapshots.append(sae.W_enc.detach().clone())

    with pytest.raises(NonFiniteActivationError, match=r"step 4 \(epoch 0, batch 3\).*NaN or inf"):
        train_sae(sae, TensorSource(x, shuffle=False), quiet(init_tokens=256), reporter=Spy())
    assert len(snapshots) == 3 and torch.equal(sae.W_enc, snapshots[-1])
    assert torch.isfinite(sae.W_enc).all()


def test_nan_in_the_initialisation_tokens_is_refused():
    x = sparse_data(512)
    x[7, 0] = float("inf")
    sae = build_sae(tiny_sae(top_k=3), seed=0)
    with pytest.raises(NonFiniteActivationError, match="NaN or inf.*initialisation"):
        train_sae(sae, TensorSource(x), quiet(), reporter=ListReporter())


def test_wrong_d_in_names_both_numbers():
    sae = build_sae(tiny_sae(top_k=3), seed=0)
    with pytest.raises(DimensionMismatchError, match=r"d_in=5 but the SAE has d_in=16"):
        train_sae(sae, TensorSource(torch.randn(100, 5)), quiet(), reporter=ListReporter())


class _NanObjective(Objective):
    def step(self, sae, batch):
        return StepOutput(sae.b_dec.sum() * float("nan"), {}, torch.zeros(D_SAE, dtype=torch.bool))

    def evaluate(self, sae, val_source, max_tokens):
        return {}


def test_custom_objective_seam_and_divergence_error():
    sae = build_sae(tiny_sae(top_k=3), seed=0)
    with pytest.raises(TrainingDivergedError, match="step 1: the training loss is nan"):
        train_sae(sae, TensorSource(sparse_data(256)), quiet(), reporter=ListReporter(),
                  objective=_NanObjective(quiet()))


def test_lr_schedule_hand_case():
    s = Schedule(TrainingConfig(lr_warmup_steps=1000, lr_decay_fraction=0.2), 1.0, 100)
    assert s.warmup == 10  # capped at a tenth of the run
    assert [s.lr(i) for i in (0, 4, 9, 50, 79, 80, 90, 99)] == [
        0.1, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.05]


def test_outlier_policies_hand_case():
    x = torch.tensor([[3.0, 4.0], [30.0, 40.0], [0.0, 1.0]])  # norms 5, 50, 1
    y = torch.tensor([[1.0], [2.0], [300.0]])  # a transcoder's target rows (never measured)
    obj = LocalObjective(TrainingConfig(outlier_policy="drop"))
    obj.outlier_cap = 10.0
    kept = obj._apply_outlier_policy(TokenBatch.of(x))
    assert torch.equal(kept.input, x[[0, 2]]) and kept.autoencodes
    kept = obj._apply_outlier_policy(TokenBatch(x, y))  # decided on the input, applied to both
    assert torch.equal(kept.input, x[[0, 2]]) and torch.equal(kept.target, y[[0, 2]])
    same = TokenBatch.of(x[[0, 2]])
    assert obj._apply_outlier_policy(same) is same  # nothing to drop: no copy
    obj = LocalObjective(TrainingConfig(outlier_policy="clip"))
    obj.outlier_cap = 10.0
    clipped = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 1.0]])
    out = obj._apply_outlier_policy(TokenBatch.of(x))
    assert torch.allclose(out.input, clipped) and out.autoencodes  # an SAE's target: clipped
    out = obj._apply_outlier_policy(TokenBatch(x, y))
    assert torch.allclose(out.input, clipped) and out.target is y  # a transcoder's: untouched
    # the cap comes from the median norm of the initialisation tokens
    data = sparse_data(1024)
    data[::100] *= 50  # BOS-like rows
    obj = LocalObjective(quiet())
    sae = build_sae(tiny_sae(top_k=3), seed=0)
    obj.initialize(sae, TensorSource(data))
    median = float(sparse_data(1024).norm(dim=1).median())
    assert obj.outlier_cap == pytest.approx(10 * median, rel=0.05)
    stats = obj.step(sae, TokenBatch.of(data[:200])).stats
    assert stats["outlier_fraction"] == pytest.approx(2 / 200)
    # the input scale ignores the outliers: E||x|| = sqrt(d_in) on the ordinary tokens
    assert float((sparse_data(1024) * sae.input_scale).norm(dim=1).mean()) == pytest.approx(4.0, rel=0.05)


def test_reconstruction_metrics_hand_case():
    acc = ReconstructionAccumulator()
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])
    acc.add(x[:1], x_hat[:1])
    acc.add(x[1:], x_hat[1:])
    # mean x = [2, 1]; sum ||x - mean||^2 = (1 + 1) + (1 + 1) = 4; SSE = 1
    out = acc.result()
    assert out["explained_variance"] == pytest.approx(0.75)
    assert out["fvu"] == pytest.approx(0.25)
    assert out["mse"] == pytest.approx(0.25)  # 1 / (2 tokens * 2 dims)


def test_density_summary_hand_case():
    counts = torch.tensor([0, 0, 5, 150, 1000, 1])  # over 1000 tokens
    out = density_summary(counts, 1000)
    assert out["dead_fraction"] == pytest.approx(2 / 6)
    assert out["dense_fraction"] == pytest.approx(2 / 6)  # 0.15 and 1.0 > 0.1
    # log10 densities: -2.3 -> bin [-3,-2), -0.82 -> [-1,0], 0 -> [-1,0], -3 -> [-3,-2)
    assert out["density_histogram"] == [0, 0, 0, 0, 0, 2, 0, 2]


def test_metrics_record_round_trip():
    r = MetricsRecord(step=3, tokens_seen=10, loss=1.5, loss_terms={"mse": 1.0},
                      explained_variance=0.5, density_histogram=[1, 2], kl_div=0.1)
    assert MetricsRecord.from_dict(r.to_dict()) == r
    assert r.scalars()["loss/mse"] == 1.0 and "ce_loss_clean" not in r.scalars()
    with pytest.raises(CheckpointMismatchError, match="unknown field"):
        MetricsRecord.from_dict({"step": 1, "tokens_seen": 1, "accuracy": 1.0})


def test_console_reporter_writes_one_line_per_record(tmp_path):
    import io
    stream = io.StringIO()
    train_sae(build_sae(tiny_sae(top_k=3), seed=0),
              TensorSource(sparse_data(512)), quiet(num_epochs=1, log_freq=2),
              val_source=TensorSource(sparse_data(128, seed=1)),
              reporter=ConsoleReporter(show_progress=False, stream=stream))
    lines = [l for l in stream.getvalue().splitlines() if l.startswith("step ")]
    assert len(lines) == 2 and "ev " in lines[0] and "l0_train 3.0" in lines[0] and "| l0 " in lines[0]


def test_empty_source_is_a_clear_error():
    from trainer import EmptySourceError
    sae = build_sae(tiny_sae(top_k=3), seed=0)
    with pytest.raises(EmptySourceError, match="yielded no tokens"):
        train_sae(sae, TensorSource(torch.zeros(0, D_IN)), quiet(), reporter=ListReporter())


def test_calibration_uses_training_tokens_even_without_validation_tokens():
    sae = build_sae(tiny_sae(top_k=3), seed=0)
    reporter = ListReporter()
    train_sae(sae, TensorSource(torch.randn(256, D_IN)), quiet(), reporter=reporter,
              val_source=TensorSource(torch.zeros(0, D_IN)))
    assert any("calibrated on training tokens" in m for m in reporter.messages)
    assert float(sae.threshold) > 0
