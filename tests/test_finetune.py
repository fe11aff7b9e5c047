"""Continue-don't-restart, the two-phase (local then end-to-end) schedule and the KL scale."""

from __future__ import annotations

import math

import pytest
import torch

from _e2e_helpers import D, HOOKS, SPEC, build_cache, e2e_config
from activation_cache import load_model
from trainer import (make_sae_config, TensorSource, TrainingConfig, build_sae, job_sources, load_sae,
                     train_sae)
from trainer.finetune import PhasedSource, TwoPhaseObjective


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model(SPEC)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, model):
    return build_cache(tmp_path_factory, model, "ft", store_logits=True, logits_top_k=32)


class Recorder:
    def __init__(self, stop_at_checkpoint_step=None):
        self.records, self.messages, self.stop_at = [], [], stop_at_checkpoint_step

    def on_train_start(self, **kw):
        pass

    def on_step(self, step):
        pass

    def on_metrics(self, record, checkpoint_dir):
        self.records.append(record)
        if checkpoint_dir and record.step == self.stop_at:
            raise KeyboardInterrupt

    def on_message(self, text):
        self.messages.append(text)

    def on_train_end(self, result):
        pass


def load_sae_as(sae, **options):
    """The same trained SAE (weights and buffers) under changed options of its own."""
    other = build_sae(sae.cfg.replace(**options))
    other.load_state_dict(sae.state_dict())
    return other


def _two_phase_config(**kw) -> TrainingConfig:
    base = dict(max_tokens=2400, finetune_fraction=0.25, train_batch_tokens=128, batch_size=4,
                lr=1e-2, finetune_lr=1e-3, log_freq=3, checkpoint_every=3, keep_checkpoints=20,
                logit_kl_scale="mse", save_best=False)
    base.update(kw)
    return e2e_config(**base)


def _sae(seed=0):
    return build_sae(make_sae_config(d_in=D, d_sae=64, top_k=4, hook_layer=1,
                                     threshold_warmup_steps=2), seed=seed)


def _run(model, cache, cfg, out, *, resume_from=None, reporter=None):
    s = job_sources(cache, cfg, HOOKS[0], model=model)
    return train_sae(_sae(), s.train, cfg, val_source=s.val, objective=s.objective, out_dir=out,
                     resume_from=resume_from, reporter=reporter or Recorder())


def test_a_trained_sae_is_continued_not_reinitialised():
    torch.manual_seed(0)
    x = torch.randn(2048, 16) * 3 + 2
    sae = build_sae(make_sae_config(d_in=16, d_sae=64, top_k=4, threshold_warmup_steps=2),
                    seed=0)
    cfg = TrainingConfig(train_batch_tokens=256, num_epochs=1, log_freq=4, show_progress=False)
    train_sae(sae, TensorSource(x), cfg, reporter=Recorder())
    kept = {k: v.clone() for k, v in sae.state_dict().items()}
    assert bool(sae.data_initialized) and float(sae.threshold) > 0
    # a second run on shifted data: a fresh SAE would take the new geometric median and scale
    rec = Recorder()
    second = load_sae_as(sae, threshold_beta=0.999999, calibrate_threshold=False)
    train_sae(second, TensorSource(x * 10 - 5), cfg.replace(lr=1e-12), reporter=rec)
    sae = second
    assert any("continuing from trained weights" in m for m in rec.messages)
    assert torch.equal(sae.input_scale, kept["input_scale"])
    assert torch.allclose(sae.b_dec, kept["b_dec"], atol=1e-6)
    assert float(sae.threshold) == pytest.approx(float(kept["threshold"]), rel=1e-3)


def test_init_from_a_saved_sae_keeps_its_state(tmp_path):
    from trainer import train_from_yaml
    import trainer.job as job_module

    class Reader:
        manifest = {"splits": {"train": {}, "val": {}}}

        def token_source(self, hook, split="train"):
            g = torch.Generator().manual_seed(1 if split == "train" else 2)
            return TensorSource(torch.randn(512, 16, generator=g) * 4 + 1)

    sae = build_sae(make_sae_config(d_in=16, d_sae=64, top_k=4, hook_layer=2), seed=0)
    sae.initialize_from_data(torch.randn(256, 16) * 9 + 3)
    with torch.no_grad():
        sae.threshold.fill_(0.7)
    sae.save(tmp_path / "start")
    saved = load_sae(tmp_path / "start")
    job = tmp_path / "job.yaml"
    job.write_text(f"""
cache: c
out_dir: {tmp_path / 'out'}
sae: {{d_in: 16, d_sae: 64, top_k: 4, hook_layer: 2, calibrate_threshold: false}}
training: {{max_tokens: 256, train_batch_tokens: 128, lr: 1.0e-12, show_progress: false,
           init_from: {tmp_path / 'start'}}}
""")
    orig = job_module._open_cache
    job_module._open_cache = lambda uri: Reader()
    try:
        result = train_from_yaml(job)
        assert torch.allclose(result.sae.b_dec, saved.b_dec, atol=1e-6)
        assert float(result.sae.threshold) == pytest.approx(0.7, rel=1e-3)  # only the EMA moves it
        assert float(result.sae.input_scale) == 1.0  # the saved SAE was folded
        # a different shape is refused before training
        job.write_text(job.read_text().replace("d_sae: 64", "d_sae: 32"))
        from activation_cache import ConfigError
        with pytest.raises(ConfigError, match="init_from .* d_sae=64, but the job's sae.d_sae is 32"):
            train_from_yaml(job)
    finally:
        job_module._open_cache = orig


def test_two_phase_plan_schedule_and_metrics(model, cache, tmp_path):
    cfg = _two_phase_config()
    s = job_sources(cache, cfg, HOOKS[0], model=model)
    assert isinstance(s.objective, TwoPhaseObjective) and isinstance(s.train, PhasedSource)
    s1, s2 = s.objective.phase_steps(s.train)
    assert s1 == math.ceil(0.75 * 2400 / 128)  # 15 local steps
    per_window_step = s.train.sequences.num_tokens / math.ceil(
        s.train.sequences.num_sequences / 4)
    assert s2 == math.ceil(0.25 * 2400 / per_window_step)
    sched = s.objective.schedule(1e-2, s1 + s2)
    assert sched.lr(s1 - 1) < 1e-2 * 0.5  # phase 1 decays towards 0 at its end
    assert sched.lr(s1 + s2 // 2) == pytest.approx(1e-3)  # phase 2 at finetune_lr
    rec = Recorder()
    result = train_sae(_sae(), s.train, cfg, val_source=s.val, objective=s.objective,
                       reporter=rec)
    assert result.steps == s1 + s2
    local = [r for r in result.history if r.step < s1]
    tuned = [r for r in result.history if r.step >= s1]  # from the boundary on
    assert local and tuned
    assert all(r.kl_div is None for r in local)  # phase 1: reconstruction metrics only
    assert all(r.kl_div is not None and r.ce_loss_delta is not None for r in tuned)
    assert "kl" in tuned[-1].loss_terms and "kl" not in local[0].loss_terms
    assert s.objective.e2e.kl_scale is not None and s.objective.e2e.kl_scale > 0
    assert result.final.l0 is not None and float(result.sae.threshold) > 0


@pytest.mark.parametrize("stop", [6, 15, 18], ids=["in-local", "at-boundary", "in-finetune"])
def test_two_phase_resume_is_bit_exact(model, cache, tmp_path, stop):
    cfg = _two_phase_config()
    straight = _run(model, cache, cfg, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(model, cache, cfg, tmp_path / "b", reporter=Recorder(stop_at_checkpoint_step=stop))
    resumed = _run(model, cache, cfg, tmp_path / "b",
                   resume_from=tmp_path / "b" / "checkpoints" / f"step_{stop:08d}")
    assert resumed.steps == straight.steps
    a, b = straight.sae.state_dict(), resumed.sae.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r.loss for r in straight.history] == [r.loss for r in resumed.history]
    assert straight.final.kl_div == resumed.final.kl_div


# -- a transcoder: MLP input -> MLP output, fine-tuned through the splice -------------------

MLP_IN, MLP_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def mlp_cache(tmp_path_factory, model):
    return build_cache(tmp_path_factory, model, "ft-mlp", store_logits=True, logits_top_k=32,
                       store_splice_residual=True, hooks=(MLP_IN, MLP_OUT))


@pytest.mark.parametrize("arch", ["batchtopk_transcoder", "batchtopk_skip_transcoder"])
def test_a_transcoder_fine_tunes_end_to_end(model, mlp_cache, tmp_path, arch):
    """Two phases on the tiny model with a transcoder from the MLP input to hook_mlp_out: the
    local phase fits the MLP output, the fine-tune's KL comes from splicing the transcoder's
    output in place of the MLP output, and the run resumes bit for bit across the boundary."""
    cfg = _two_phase_config()
    sae_cfg = make_sae_config(d_in=D, d_sae=64, architecture=arch, top_k=4, hook_layer=1,
                              hook_name="ln2.hook_normalized", hook_name_out="hook_mlp_out",
                              threshold_warmup_steps=2)

    def run(out, **kw):
        s = job_sources(mlp_cache, cfg, sae_cfg.hook_spec, target_hook=sae_cfg.hook_spec_out,
                        model=model)
        assert s.train.tokens.target_hook == MLP_OUT and s.train.sequences.target_hook == MLP_OUT
        assert s.objective.e2e.site(build_sae(sae_cfg)).hook_name == MLP_OUT
        return train_sae(build_sae(sae_cfg, seed=0), s.train, cfg, val_source=s.val,
                         objective=s.objective, out_dir=out, reporter=kw.pop("reporter", None)
                         or Recorder(), **kw)

    straight = run(tmp_path / "a")
    s1 = math.ceil(0.75 * 2400 / 128)  # the local phase's steps (as in the SAE case above)
    local = [r for r in straight.history if r.step < s1]
    tuned = [r for r in straight.history if r.step >= s1]
    assert local and tuned and all(r.kl_div is None for r in local)
    assert all(r.kl_div is not None and math.isfinite(r.kl_div) for r in tuned)
    assert "kl" in tuned[-1].loss_terms
    # the reconstruction is of the MLP output (its own scale), not of the input
    assert float(straight.sae.output_scale) != float(straight.sae.input_scale)
    # both phases move it the right way on this short budget: the local phase lowers the FVU
    # of the MLP output, the fine-tune the KL of the spliced model
    assert straight.final.fvu < local[0].fvu and straight.final.l0 > 0
    assert tuned[-1].kl_div < tuned[0].kl_div
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", reporter=Recorder(stop_at_checkpoint_step=18))
    resumed = run(tmp_path / "b", resume_from=tmp_path / "b" / "checkpoints" / "step_00000018")
    a, b = straight.sae.state_dict(), resumed.sae.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert straight.final.kl_div == resumed.final.kl_div


# -- the published recipe: batch in sequences, linear decay, balanced KL, the short-run warning --


def test_finetune_batch_schedule_and_balanced_kl(model, cache):
    """finetune_batch_sequences sizes the fine-tune's steps; finetune_schedule: linear decays
    from finetune_lr on its first step to 0 with no warm-up; the balanced scale reports alpha."""
    cfg = _two_phase_config(finetune_batch_sequences=2, finetune_schedule="linear",
                            logit_kl_scale="balanced", lr_warmup_steps=None,
                            lr_warmup_fraction=0.2)
    s = job_sources(cache, cfg, HOOKS[0], model=model)
    s1, s2 = s.objective.phase_steps(s.train)
    seqs = s.train.sequences
    assert s.objective.e2e.steps_per_epoch(seqs) == math.ceil(seqs.num_sequences / 2)
    assert s2 == math.ceil(0.25 * 2400 / (seqs.num_tokens / math.ceil(seqs.num_sequences / 2)))
    sched = s.objective.schedule(1e-2, s1 + s2)
    assert sched.lr(0) < 1e-2  # the local phase keeps its warm-up
    assert sched.lr(s1) == pytest.approx(1e-3)  # no warm-up: the peak on the first step
    for i in range(s2):
        assert sched.lr(s1 + i) == pytest.approx(1e-3 * (s2 - i) / s2)
    result = train_sae(_sae(), s.train, cfg, val_source=s.val, objective=s.objective,
                       reporter=Recorder())
    assert result.steps == s1 + s2
    tuned = [r for r in result.history if r.step > s1]
    assert tuned and tuned[-1].loss_terms["kl_alpha"] > 0
    assert s.objective.e2e.kl_scale is None  # nothing fixed once


def test_a_short_finetune_is_warned_about(model, cache):
    cfg = _two_phase_config()
    s = job_sources(cache, cfg, HOOKS[0], model=model)
    rec = Recorder()
    train_sae(_sae(), s.train, cfg, val_source=s.val, objective=s.objective, reporter=rec)
    _, s2 = s.objective.phase_steps(s.train)
    warned = [m for m in rec.messages if "too short to move the CE loss" in m]
    assert warned == [f"warning: a fine-tune of {s2} steps is too short to move the CE loss; "
                      "the published recipe uses thousands"]
    obj = TwoPhaseObjective(model, cfg)
    obj._plan = (10, 199)
    assert len(obj.warnings(s.train)) == 1
    obj._plan = (10, 200)
    assert obj.warnings(s.train) == []


@pytest.mark.parametrize("fields, message", [
    (dict(finetune_batch_sequences=0), "finetune_batch_sequences: must be an integer >= 1"),
    (dict(finetune_schedule="cosine"), "finetune_schedule: must be one of phase, linear"),
    (dict(finetune_fraction=0.0, finetune_lr=1e-4), "finetune_lr: only applies to a fine-tune"),
    (dict(finetune_fraction=0.0, finetune_lr=None, finetune_batch_sequences=2),
     "finetune_batch_sequences: only applies to a fine-tune"),
    (dict(finetune_fraction=0.0, finetune_lr=None, finetune_schedule="linear"),
     "finetune_schedule: only applies to a fine-tune"),
])
def test_finetune_fields_are_validated(fields, message):
    from activation_cache import ConfigError
    with pytest.raises(ConfigError, match=message):
        _two_phase_config(**fields)


def test_a_two_phase_run_times_its_fine_tune_steps_apart(model, cache, tmp_path):
    from trainer import PhaseTimer

    cfg = _two_phase_config()
    timer = PhaseTimer()
    with timer.activate():
        s = job_sources(cache, cfg, HOOKS[0], model=model)
        result = train_sae(_sae(), s.train, cfg, val_source=s.val, objective=s.objective,
                           out_dir=tmp_path / "out", reporter=Recorder())
    cols = timer.columns()
    s1, s2 = s.objective.phase_steps(s.train)
    assert result.steps == s1 + s2 and s2 > 0
    # both kinds of step were timed, each under its own phase; the rest is not training
    assert cols["time_train_s"] > 0 and cols["time_finetune_s"] > 0
    assert cols["time_eval_val_s"] > 0 and cols["time_checkpoint_s"] > 0
    assert "time_model_load_s" in cols  # job_sources' phase (the model was passed in: ~0 s)
    phases = sum(v for k, v in cols.items()
                 if k not in ("time_eval_s", "time_other_s", "time_wall_s"))
    assert cols["time_wall_s"] >= phases


def test_a_worker_loads_the_cache_model_once_for_its_trials(cache):
    """Trials that run one after another in one worker (Ray reuses the actor) share the frozen
    model instead of loading it per trial; it is still identity-checked against each cache."""
    from activation_cache import CacheMismatchError
    from trainer import load_cache_model

    first = load_cache_model(cache)
    assert load_cache_model(cache) is first
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    fresh = load_cache_model(cache, reuse=False)
    assert fresh is not first and load_cache_model(cache) is fresh  # one model kept at a time

    class OtherModelCache:  # a cache of another model with the same spec: refused
        manifest = cache.manifest

        def check_model(self, identity):
            raise CacheMismatchError("built from another model")

    with pytest.raises(CacheMismatchError, match="another model"):
        load_cache_model(OtherModelCache())
