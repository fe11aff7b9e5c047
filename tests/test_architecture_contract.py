"""The contract every registered architecture meets, parametrized over
``trainer.architecture_names()``: a new architecture registered under trainer/saes/ is tested
here without touching this file.

Per architecture: the registry and config round trip, the training forward's record (shapes,
no hidden state), per-token inference encoding, save/load, the SAELens format (the full SAELens
round trip is tests/test_export_saelens.py, parametrized the same way), the model card's
description, training lowers the loss, resume is bit-exact, the decoder-gradient projection in
the real loop, and one end-to-end step on the tiny transformer_lens model.

Everything goes through the input -> target shape: an SAE's batches carry its input as the
target; a transcoder (its options say ``transcodes``) gets a target of another width
(``D_OUT``) that its input determines (the same sparse codes through another dictionary), and
its end-to-end step reads the MLP input and replaces the MLP output.
"""

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

import trainer
from activation_cache import ConfigError
from trainer import (SAE, DimensionMismatchError, EndToEndObjective, SAEConfig, SAELensFormat,
                     SequenceSource, TensorSource, TrainingConfig, TrainStepOutput,
                     architecture_names, build_sae, describe_sae, field_catalog, load_sae,
                     make_sae_config, sae_config_from_dict, train_sae)
from trainer.checkpoint import latest_checkpoint
from trainer.registry import options_class, sae_class
from trainer.sae_config import ArchitectureOptions

from _e2e_helpers import D as E2E_D, HOOKS, SPEC, build_cache, e2e_config

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = architecture_names()
D_IN, D_SAE, D_OUT = 16, 64, 12
E2E_MLP_IN = "blocks.1.ln2.hook_normalized"  # the tiny model's MLP input (RMSNorm, unit weights)


def transcodes(arch: str) -> bool:
    return options_class(arch).transcodes


def tiny_options(arch: str) -> dict:
    """The architecture's own fields for these tiny cases, chosen by field name (not by
    architecture), so a new architecture whose required fields are among these just works."""
    fields = options_class(arch).field_names()
    out = {"top_k": 4} if "top_k" in fields else {}
    if "threshold_warmup_steps" in fields:  # the short runs here need an early threshold EMA
        out.update(threshold_warmup_steps=4, calibration_tokens=512)
    if "jumprelu_init_l0" in fields:  # start dense on the tiny task (3-sparse codes, 64 wide)
        out["jumprelu_init_l0"] = D_SAE / 2
    return out


def tiny_config(arch: str, **kw) -> SAEConfig:
    if transcodes(arch):
        kw.setdefault("hook_name_out", "hook_mlp_out")
        kw.setdefault("d_out", D_OUT)
    return make_sae_config(d_in=kw.pop("d_in", D_IN), d_sae=kw.pop("d_sae", D_SAE),
                           architecture=arch, **tiny_options(arch), **kw)


def sparse_codes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, 32, generator=g).argsort(1)[:, :3]
    return torch.zeros(n, 32).scatter_(1, idx, torch.rand(n, 3, generator=g) * 4 + 1)


def _dictionary(width: int, seed: int) -> torch.Tensor:
    d = torch.randn(32, width, generator=torch.Generator().manual_seed(seed))
    return d / d.norm(dim=1, keepdim=True)


def sparse_data(n: int, seed: int = 0) -> torch.Tensor:
    """Tokens that are 3-sparse combinations of a fixed random dictionary, plus an offset."""
    g = torch.Generator().manual_seed(seed + 10_000)
    return sparse_codes(n, seed) @ _dictionary(D_IN, 123) + 2.0 + 0.01 * torch.randn(
        n, D_IN, generator=g)


def sparse_target(n: int, seed: int = 0) -> torch.Tensor:
    """A transcoder's target rows for ``sparse_data(n, seed)``: the same codes through another
    dictionary into D_OUT dimensions, another offset."""
    return sparse_codes(n, seed) @ _dictionary(D_OUT, 321) * 0.5 - 1.0


def pair(arch: str, n: int, seed: int = 0, scale: float = 1.0) -> tuple:
    """``(input, target)`` for ``arch``: an SAE's target is its input (the same tensor)."""
    x = sparse_data(n, seed) * scale
    return x, (sparse_target(n, seed) * scale if transcodes(arch) else x)


def source(arch: str, n: int, seed: int = 0) -> TensorSource:
    x, y = pair(arch, n, seed)
    return TensorSource(x, None if y is x else y)


def quiet(**kw) -> TrainingConfig:
    base = dict(num_epochs=1, train_batch_tokens=128, lr=1e-2, log_freq=6, show_progress=False,
                checkpoint_every=None, lr_warmup_steps=2, init_tokens=512,
                eval_max_tokens=512)
    base.update(kw)
    return TrainingConfig(**base)


class Recorder:
    """A reporter that keeps the records and can simulate a kill right after a checkpoint."""

    def __init__(self, stop_at_checkpoint_step=None):
        self.records, self.steps, self.stop_at = [], [], stop_at_checkpoint_step

    def on_train_start(self, *, total_steps, start_step, description):
        self.start = start_step

    def on_step(self, step):
        self.steps.append(step)

    def on_metrics(self, record, checkpoint_dir):
        self.records.append(record)
        if checkpoint_dir and record.step == self.stop_at:
            raise KeyboardInterrupt

    def on_message(self, text):
        pass

    def on_train_end(self, result):
        pass


def shippable(arch: str, seed: int = 0) -> SAE:
    """An SAE with data-initialised scaling, every parameter moved off its initial value, and
    its inference encoding calibrated when it needs that: what export would ship."""
    sae = build_sae(tiny_config(arch), seed=seed)
    x, y = pair(arch, 512, seed=seed, scale=5)
    sae.initialize_from_data(x, y)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    sae.normalize_decoder()
    if sae.needs_calibration:
        assert sae.calibrate(iter([x]), max_tokens=512) is not None
    return sae.eval()


# -- the registry and the seam -------------------------------------------------------------


def test_every_architecture_is_registered_and_exported():
    assert len(ARCHS) >= 7 and ARCHS == sorted(ARCHS)
    assert 2 <= len(field_catalog().transcoders) < len(ARCHS)  # both kinds are covered here
    for arch in ARCHS:
        klass = sae_class(arch)
        assert issubclass(klass, SAE) and klass.architecture == arch
        assert issubclass(klass.Options, ArchitectureOptions)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_output_side_is_the_architectures(arch):
    """An SAE reconstructs its input (an output hook of its own is refused); a transcoder
    writes its own hook and width, with its own output scale and no input centring."""
    cfg = tiny_config(arch, hook_layer=2)
    sae = build_sae(cfg)
    if not transcodes(arch):
        assert cfg.autoencodes and cfg.hook_spec_out == cfg.hook_spec and cfg.d_out == D_IN
        assert sae.input_bias() is sae.b_dec and sae.output_scaling() is sae.input_scale
        with pytest.raises(ConfigError, match=r"SAEConfig.hook_name_out: architecture .* "
                                              r"reconstructs its own input"):
            tiny_config(arch, hook_name_out="hook_mlp_out")
        return
    assert not cfg.autoencodes and cfg.hook_spec_out == "blocks.2.hook_mlp_out"
    assert "hook_spec_out" not in cfg.to_dict()  # derived: follows hook_layer
    assert cfg.replace(hook_layer=4).hook_spec_out == "blocks.4.hook_mlp_out"
    assert sae.W_dec.shape == (D_SAE, D_OUT) and sae.b_dec.shape == (D_OUT,)
    assert sae.input_bias() is None and sae.output_scaling() is sae.output_scale
    x, y = pair(arch, 256, scale=5)
    sae.initialize_from_data(x, y)
    # each side scaled to E||.|| = sqrt(width) on its own data
    assert float((x * sae.input_scale).norm(dim=1).mean()) == pytest.approx(D_IN ** 0.5, rel=1e-4)
    assert float((y * sae.output_scale).norm(dim=1).mean()) == pytest.approx(D_OUT ** 0.5,
                                                                            rel=1e-4)
    with pytest.raises(DimensionMismatchError, match="needs its target rows"):
        sae.training_forward(x)  # a transcoder has no target without one
    with pytest.raises(DimensionMismatchError, match="d_out=12"):
        sae.training_forward(x, x.clone())  # one of the input's width is not its target


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trip_and_searchable_fields(arch):
    cfg = tiny_config(arch, hook_layer=3)
    assert sae_config_from_dict(cfg.to_dict()) == cfg
    assert type(build_sae(cfg)) is sae_class(arch)
    catalog = field_catalog()
    fields = catalog.owned[arch]
    assert set(catalog.searchable[arch]) <= set(fields)
    assert set(catalog.width_capped[arch]) <= set(fields)
    assert all(catalog.config_of(f) == "sae" for f in fields)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_returns_the_typed_record_and_changes_no_state(arch):
    sae = build_sae(tiny_config(arch), seed=0).train()
    x, y = pair(arch, 3 * 40)
    x, y = x.reshape(3, 40, D_IN), y.reshape(3, 40, -1)  # any leading dimensions
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    out = sae.training_forward(x, y)
    assert isinstance(out, TrainStepOutput)
    assert out.target_scaled.shape == out.output.shape == (120, sae.cfg.d_out)
    assert out.reconstruction_loss.shape == out.sparsity_loss.shape == out.l0.shape == ()
    assert out.reconstruction_loss.requires_grad
    assert "mse" in out.terms and all(not t.requires_grad for t in out.terms.values())
    assert out.fired.dtype == torch.bool and out.fired.shape == (D_SAE,)
    assert 0 < float(out.l0) <= D_SAE
    assert all(math.isfinite(float(t)) for t in out.terms.values())
    for name, value in sae.state_dict().items():  # pure: no hidden state
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_encoding_is_per_token(arch):
    sae = shippable(arch)
    x = sparse_data(64, seed=7) * 5
    full = sae.encode(x)
    assert full.shape == (64, D_SAE) and (full > 0).any()
    for part in (slice(5, 6), slice(10, 30)):
        alone = sae.encode(x[part])
        assert torch.equal(alone > 0, full[part] > 0)
        torch.testing.assert_close(alone, full[part], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_threshold_is_a_plain_float_or_none(arch):
    sae = shippable(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no float() of a tensor that requires grad
        value = sae.inference_threshold()
    assert value is None or (type(value) is float and math.isfinite(value) and value >= 0)


# -- persistence and export ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    sae = shippable(arch)
    assert float(sae.input_scale) != 1.0
    x = sparse_data(100, seed=3) * 5
    sae.save(tmp_path / "folded", history=[{"step": 1, "tokens_seen": 2}])
    loaded, history = load_sae(tmp_path / "folded", load_history=True)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert history == [{"step": 1, "tokens_seen": 2}]
    loaded.eval()
    folded = sae.folded_copy().eval()
    assert float(loaded.input_scale) == 1.0 and float(loaded.output_scaling()) == 1.0
    for name, value in folded.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    f = loaded.encode(x)
    assert torch.equal(f, folded.encode(x)) and torch.equal(loaded.decode(f), folded.decode(f))
    # folding changes the arithmetic only: the same codes, values equal to float precision
    assert torch.equal(f > 0, sae.encode(x) > 0)
    torch.testing.assert_close(loaded(x)[0], sae(x)[0], rtol=1e-4, atol=1e-4)
    # unfolded (as checkpoints are): bit-identical to the original
    sae.save(tmp_path / "unfolded", fold=False)
    same = load_sae(tmp_path / "unfolded").eval()
    f = same.encode(x)
    assert torch.equal(f, sae.encode(x)) and torch.equal(same.decode(f), sae.decode(f))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_model_card_describes_the_architecture_by_itself(arch):
    """The card's lines come from the architecture: its own fields with their values and its
    inference rule (never another architecture's words)."""
    cfg = tiny_config(arch)
    desc = describe_sae(cfg)
    assert desc.architecture == arch and desc.inference and desc.inference == \
        sae_class(arch).inference_rule
    assert set(desc.fields) == set(field_catalog().owned[arch])
    summary = desc.summary()
    assert summary.startswith(f"{arch}, d_sae = {D_SAE}")
    for name, value in desc.fields.items():
        assert f"{name} = {value}" in summary


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_format_names_a_sae_lens_architecture(arch):
    registry = pytest.importorskip("sae_lens.registry")
    sae = shippable(arch)
    fmt = sae.saelens_format(sae.folded_copy())
    assert isinstance(fmt, SAELensFormat)
    assert fmt.architecture in registry.SAE_CLASS_REGISTRY
    for name, tensor in fmt.tensors.items():
        assert isinstance(tensor, torch.Tensor) and torch.isfinite(tensor).all(), name


# -- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss(arch):
    # a transcoder learns a new map (its encoder starts random, not as the decoder's
    # transpose): give it more steps on the tiny task
    epochs = 8 if transcodes(arch) else 3
    rep = Recorder()
    result = train_sae(build_sae(tiny_config(arch), seed=0), source(arch, 1024),
                       quiet(num_epochs=epochs, log_freq=2 * epochs),
                       val_source=source(arch, 256, seed=1), reporter=rep)
    assert result.steps == 8 * epochs
    assert [r.step for r in rep.records] == [2 * epochs * i for i in (1, 2, 3, 4)]
    first, last = rep.records[0], rep.records[-1]
    assert last.loss < 0.8 * first.loss, (first.loss, last.loss)
    assert last.mse < first.mse and last.explained_variance > 0.3


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_is_bit_exact(arch, tmp_path):
    cfg = tiny_config(arch, n_batches_to_dead=2)  # AuxK active on the k-sparse ones
    tc = quiet(num_epochs=2, checkpoint_every=7, log_freq=5)
    train, val = source(arch, 1024), source(arch, 256, seed=1)
    straight = train_sae(build_sae(cfg, seed=0), train, tc, val_source=val,
                         out_dir=tmp_path / "a", reporter=Recorder())
    with pytest.raises(KeyboardInterrupt):  # killed right after the step-7 checkpoint
        train_sae(build_sae(cfg, seed=0), train, tc, val_source=val, out_dir=tmp_path / "b",
                  reporter=Recorder(stop_at_checkpoint_step=7))
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_00000007"
    rep = Recorder()
    resumed = train_sae(build_sae(cfg, seed=99), train, tc, val_source=val,
                        out_dir=tmp_path / "b", resume_from=ckpt, reporter=rep)
    assert rep.start == 7 and rep.steps[0] == 8
    assert resumed.steps == straight.steps == 16
    # step 14: mid-training state (e.g. BatchTopK's threshold EMA, which the final calibration
    # overwrites); step 16: the end, after calibration
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step_00000014", "step_00000016"]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ckpts
    for sub in [f"checkpoints/{c}/{f}" for c in ckpts
                for f in ("weights.safetensors", "trainer_state.safetensors")] + [
            "final/weights.safetensors"]:
        a, b = load_file(str(tmp_path / "a" / sub)), load_file(str(tmp_path / "b" / sub))
        assert set(a) == set(b), sub
        for name in a:  # weights, buffers, Adam moments and steps, RNG
            assert torch.equal(a[name], b[name]), f"{sub}: {name}"
    for p, q in zip(straight.history, resumed.history):
        assert (p.step, p.loss, p.mse, p.threshold) == (q.step, q.loss, q.mse, q.threshold)
    assert len(straight.history) == len(resumed.history)


def _parallel_fraction(grad: torch.Tensor, w: torch.Tensor) -> float:
    """Largest |g_i . w_i| / (||g_i|| ||w_i||) over the decoder rows with a gradient."""
    dot = (grad * w).sum(1).abs()
    norms = grad.norm(dim=1) * w.norm(dim=1)
    has = norms > 0
    assert has.sum() >= 8
    return float((dot[has] / norms[has]).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_gradient_is_orthogonal_to_the_rows_before_adam(arch, monkeypatch):
    """In the real loop, the gradient Adam sees has no component along each decoder row (the
    rows only rotate; renormalisation does not fight the optimizer)."""

    def run() -> list[float]:
        sae = build_sae(tiny_config(arch), seed=0)
        seen = []
        adam_step = torch.optim.Adam.step

        def spy(self, *args, **kwargs):
            assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5)
            seen.append(_parallel_fraction(sae.W_dec.grad, sae.W_dec.detach()))
            return adam_step(self, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(torch.optim.Adam, "step", spy)
            train_sae(sae, source(arch, 384), quiet(), reporter=Recorder())
        assert len(seen) == 3
        return seen

    assert max(run()) < 1e-5
    # the check can fail: without the projection the gradients have a parallel component
    monkeypatch.setattr(SAE, "project_decoder_gradients", lambda self: None)
    assert max(run()) > 1e-2


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e_model():
    from activation_cache import load_model

    return load_model(SPEC)


@pytest.fixture(scope="module")
def e2e_cache(tmp_path_factory, e2e_model):
    return build_cache(tmp_path_factory, e2e_model, "contract", n_train=8, n_val=8,
                       store_splice_residual=True, hooks=HOOKS + (E2E_MLP_IN,))


def e2e_sae_config(arch: str) -> SAEConfig:
    """An SAE on the tiny model's layer-1 residual; a transcoder from its MLP input to its MLP
    output (the splice then replaces the MLP output)."""
    if transcodes(arch):
        return tiny_config(arch, d_in=E2E_D, hook_layer=1, hook_name="ln2.hook_normalized",
                           hook_name_out="hook_mlp_out", d_out=E2E_D)
    return tiny_config(arch, d_in=E2E_D, hook_layer=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_end_to_end_objective_step(arch, e2e_model, e2e_cache):
    sae = build_sae(e2e_sae_config(arch), seed=0)
    cfg = e2e_config(use_block_mse=True)
    obj = EndToEndObjective(e2e_model, cfg)
    windows = SequenceSource(e2e_cache, "train", sae.cfg.hook_spec,
                             target_hook=sae.cfg.hook_spec_out, shuffle=False)
    assert obj.site(sae).hook_name == sae.cfg.hook_spec_out
    obj.initialize(sae, windows)
    sae.train()
    out = obj.step(sae, next(iter(windows.batches(8))))
    assert out.loss.shape == () and math.isfinite(float(out.loss.detach()))
    assert {"kl", "mse", "l0"} <= set(out.stats)
    for name, value in out.stats.items():
        assert math.isfinite(float(value)), name
    assert float(out.stats["kl"]) > 0
    assert out.fired.dtype == torch.bool and out.fired.shape == (sae.cfg.d_sae,) and out.fired.any()
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sae.W_enc.grad.abs().sum() > 0 and sae.W_dec.grad.abs().sum() > 0
    assert all(p.grad is None for p in e2e_model.parameters())  # the model stays frozen


@pytest.mark.parametrize("arch", ARCHS)
def test_training_under_bf16_autocast_keeps_fp32_state(arch):
    """TrainingConfig.autocast: a bf16 forward (meant for GPUs; CPU autocast checks the dtypes
    here): the loss stays finite and parameters, buffers and running statistics stay fp32."""
    sae = build_sae(tiny_config(arch), seed=0)
    result = train_sae(sae, source(arch, 1024), quiet(autocast="bf16"),
                       val_source=source(arch, 256, seed=1), reporter=_Silent())
    assert result.steps == 8 and math.isfinite(result.final.fvu) and result.final.fvu < 1.0
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert all(b.dtype in (torch.float32, torch.int64, torch.bool) for b in sae.buffers())


class _Silent:
    def on_train_start(self, **kw): pass
    def on_step(self, step): pass
    def on_metrics(self, record, checkpoint_dir): pass
    def on_message(self, text): pass
    def on_train_end(self, result): pass
