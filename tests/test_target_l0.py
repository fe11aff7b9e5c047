"""``target_l0`` (trainer/saes/target_l0.py) and JumpReLU's data-set initial thresholds: the
update rule by hand, its running statistics and their merge over chunks, bit-exact resume, the
target reached in training, and JumpReLU's L0 following its coefficient at any input scale."""

import math

import pytest
import torch
from safetensors.torch import load_file

from trainer import (TensorSource, TrainingConfig, TrainingProgress, build_sae, field_catalog,
                     describe_sae, load_sae, make_sae_config, train_sae)
from trainer.saes.target_l0 import adapted_coefficient
from activation_cache import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_SAE = 16, 64
TARGETED = ("standard", "jumprelu")
COEFFICIENT = {"standard": "l1_coefficient", "jumprelu": "l0_coefficient"}


class Quiet:
    def __init__(self, stop_at=None):
        self.records, self.stop_at = [], stop_at

    def on_train_start(self, **kw):
        pass

    def on_step(self, step):
        pass

    def on_metrics(self, record, checkpoint_dir):
        self.records.append(record)
        if checkpoint_dir and record.step == self.stop_at:
            raise KeyboardInterrupt

    def on_message(self, text):
        pass

    def on_train_end(self, result):
        pass


def sparse_data(n: int, seed: int = 0, d_in: int = D_IN, n_feat: int = 48, active: int = 6,
                scale: float = 1.0) -> torch.Tensor:
    """Tokens that are ``active``-sparse combinations of a fixed random dictionary, an offset."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_feat, d_in, generator=torch.Generator().manual_seed(123))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_feat, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n, n_feat).scatter_(1, idx, torch.rand(n, active, generator=g) * 4 + 1)
    return scale * (codes @ dictionary + 2.0 + 0.01 * torch.randn(n, d_in, generator=g))


def quiet(**kw) -> TrainingConfig:
    base = dict(num_epochs=1, train_batch_tokens=256, lr=1e-2, log_freq=10**6,
                show_progress=False, checkpoint_every=None, init_tokens=1024,
                eval_max_tokens=2048, save_best=False)
    base.update(kw)
    return TrainingConfig(**base)


# -- the rule, by hand -------------------------------------------------------------------------


def test_adapted_coefficient_hand_cases():
    c = torch.tensor(0.01)
    # L0 twice the target: x exp(0.1 ln 2) = x 2^0.1
    assert float(adapted_coefficient(c, torch.tensor(96.0), 48, 0.1)) == pytest.approx(
        0.01 * 2 ** 0.1, rel=1e-6)
    # half the target: x 2^-0.1
    assert float(adapted_coefficient(c, torch.tensor(24.0), 48, 0.1)) == pytest.approx(
        0.01 * 2 ** -0.1, rel=1e-6)
    # ten times the target: ln 10 > 1 is clipped to 1 -> x e^0.1
    assert float(adapted_coefficient(c, torch.tensor(480.0), 48, 0.1)) == pytest.approx(
        0.01 * math.exp(0.1), rel=1e-6)
    # nothing active: the largest decrease, x e^-0.1
    assert float(adapted_coefficient(c, torch.tensor(0.0), 48, 0.1)) == pytest.approx(
        0.01 * math.exp(-0.1), rel=1e-6)
    # on target: unchanged
    assert float(adapted_coefficient(c, torch.tensor(48.0), 48, 0.1)) == pytest.approx(0.01)


def _hand_standard(**kw):
    cfg = make_sae_config(d_in=2, d_sae=3, architecture="standard", l1_coefficient=0.5, **kw)
    sae = build_sae(cfg, seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_standard_target_l0_running_statistics_and_update_by_hand():
    sae = _hand_standard(target_l0=1.0, target_l0_rate=0.2)
    assert float(sae.sparsity_coefficient) == 0.5  # starts at l1_coefficient, fp32
    assert sae.sparsity_coefficient.dtype == torch.float32
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    # pre = [[1, 2, 1], [3, -1, -4]] -> f = [[1, 2, 1], [3, 0, 0]]: 3 + 1 active
    out = sae.training_forward(x)
    assert float(out.running["l0_sum"]) == 4.0 and float(out.running["l0_tokens"]) == 2.0
    # L1 (unit decoder rows): (4 + 3) / 2 = 3.5, weighted by the buffer
    assert float(out.sparsity_loss.detach()) == pytest.approx(0.5 * 3.5)
    # chunks of one step: the merge sums, so the step's L0 is token-weighted: (4 + 0) / 3
    chunk = sae.training_forward(torch.tensor([[-1.0, -1.0]]))  # nothing active
    merged = sae.merge_running(out.running, chunk.running)
    assert float(merged["l0_sum"]) == 4.0 and float(merged["l0_tokens"]) == 3.0
    sae.update_running_statistics(merged, TrainingProgress(1, 10))
    # L0 4/3 > 1: c = 0.5 exp(0.2 ln(4/3))
    assert float(sae.sparsity_coefficient) == pytest.approx(0.5 * (4 / 3) ** 0.2, rel=1e-6)
    assert sae.sparsity_coefficients() == {
        "l1_coefficient": pytest.approx(0.5 * (4 / 3) ** 0.2, rel=1e-6)}
    # the next step's penalty uses the adapted coefficient
    again = sae.training_forward(x)
    assert float(again.sparsity_loss.detach()) == pytest.approx(0.5 * (4 / 3) ** 0.2 * 3.5, rel=1e-6)


def test_without_target_nothing_is_tracked_and_the_coefficient_is_fixed():
    sae = _hand_standard()
    assert "sparsity_coefficient" not in sae.state_dict()  # saved SAEs are unchanged
    out = sae.training_forward(torch.tensor([[1.0, 2.0]]))
    assert out.running == {}
    sae.update_running_statistics(out.running, TrainingProgress(1, 10))
    assert sae.sparsity_coefficients() == {"l1_coefficient": 0.5}


def test_jumprelu_target_l0_running_statistics_by_hand():
    cfg = make_sae_config(d_in=3, d_sae=3, architecture="jumprelu", l0_coefficient=0.1,
                          target_l0=3.0, target_l0_rate=0.5, jumprelu_init_threshold=0.5)
    sae = build_sae(cfg, seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 0.2, 0.7], [0.1, 0.3, 0.4]])  # active: 2 and 0 -> L0 1
    out = sae.training_forward(x)
    assert float(out.running["l0_sum"]) == 2.0 and float(out.running["l0_tokens"]) == 2.0
    assert float(out.sparsity_loss.detach()) == pytest.approx(0.1 * 1.0)
    sae.update_running_statistics(out.running, TrainingProgress(1, 10))
    # ln(1/3) = -1.099 clipped to -1: c = 0.1 e^-0.5
    assert float(sae.sparsity_coefficient) == pytest.approx(0.1 * math.exp(-0.5), rel=1e-6)


def test_target_l0_options_are_validated_searchable_and_described():
    with pytest.raises(ConfigError, match="target_l0"):
        make_sae_config(d_in=4, d_sae=8, architecture="standard", target_l0=0)
    with pytest.raises(ConfigError, match=r"target_l0: must be <= d_sae \(8\)"):
        make_sae_config(d_in=4, d_sae=8, architecture="jumprelu", target_l0=9)
    with pytest.raises(ConfigError, match="l1_coefficient: must be > 0 with target_l0"):
        make_sae_config(d_in=4, d_sae=8, architecture="standard", target_l0=2,
                        l1_coefficient=0)
    with pytest.raises(ConfigError, match="target_l0_rate"):
        make_sae_config(d_in=4, d_sae=8, architecture="standard", target_l0=2,
                        target_l0_rate=0)
    with pytest.raises(ConfigError, match="target_l0"):  # not an option of topk
        make_sae_config(d_in=4, d_sae=8, architecture="topk", top_k=2, target_l0=2)
    catalog = field_catalog()
    for arch in TARGETED:
        assert "target_l0" in catalog.searchable[arch], arch
        cfg = make_sae_config(d_in=4, d_sae=8, architecture=arch, target_l0=3)
        assert "target_l0 = 3" in describe_sae(cfg).summary()
    assert set(catalog.owners("target_l0")) == set(TARGETED)


# -- JumpReLU's initial thresholds from data -----------------------------------------------------


def test_jumprelu_initial_thresholds_give_the_initial_l0_on_the_initialisation_tokens():
    x = sparse_data(2000, scale=30.0)
    for fields, expected in (({"jumprelu_init_l0": 8}, 8), ({"target_l0": 5}, 5),
                             ({}, D_SAE / 8)):
        sae = build_sae(make_sae_config(d_in=D_IN, d_sae=D_SAE, architecture="jumprelu",
                                        **fields), seed=0)
        sae.initialize_from_data(x)
        active = sae.encode(x) > 0
        # every latent fires on round(expected / d_sae * 2000) tokens: none dead
        per_latent = active.sum(0)
        assert int(per_latent.min()) >= 1
        assert float(active.sum(-1).float().mean()) == pytest.approx(expected, rel=0.02), fields
        assert sae.threshold.dtype == torch.float32
    fixed = build_sae(make_sae_config(d_in=D_IN, d_sae=D_SAE, architecture="jumprelu",
                                      jumprelu_init_threshold=0.25), seed=0)
    fixed.initialize_from_data(x)
    assert torch.equal(fixed.threshold.detach(), torch.full((D_SAE,), 0.25))


# -- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TARGETED)
def test_target_l0_is_reached_within_15_percent(arch):
    target = 6.0
    # the starting coefficients are far off the target in both directions
    start = {"standard": 1e-3, "jumprelu": 1.0}[arch]
    cfg = make_sae_config(d_in=D_IN, d_sae=D_SAE, architecture=arch, target_l0=target,
                          **{COEFFICIENT[arch]: start})
    train = TensorSource(sparse_data(8192))
    val = TensorSource(sparse_data(2048, seed=1))
    result = train_sae(build_sae(cfg, seed=0), train, quiet(num_epochs=8), val_source=val,
                       reporter=Quiet())
    assert result.steps == 8 * 32
    final = result.final
    assert final.l0 == pytest.approx(target, rel=0.15), (arch, final.l0)
    assert final.dead_fraction < 0.5 and final.fvu < 0.9  # no collapse
    fixed = train_sae(build_sae(cfg.replace(target_l0=None), seed=0), train,
                      quiet(num_epochs=8), val_source=val, reporter=Quiet())
    assert abs(fixed.final.l0 - target) > 0.3 * target  # the start alone is far off


@pytest.mark.parametrize("arch", TARGETED)
def test_target_l0_resumes_bit_exactly(arch, tmp_path):
    from trainer.checkpoint import latest_checkpoint

    cfg = make_sae_config(d_in=D_IN, d_sae=D_SAE, architecture=arch, target_l0=6.0)
    tc = quiet(num_epochs=2, train_batch_tokens=128, checkpoint_every=7, log_freq=5)
    train = TensorSource(sparse_data(1024))
    train_sae(build_sae(cfg, seed=0), train, tc, out_dir=tmp_path / "a", reporter=Quiet())
    with pytest.raises(KeyboardInterrupt):
        train_sae(build_sae(cfg, seed=0), train, tc, out_dir=tmp_path / "b",
                  reporter=Quiet(stop_at=7))
    train_sae(build_sae(cfg, seed=5), train, tc, out_dir=tmp_path / "b",
              resume_from=latest_checkpoint(tmp_path / "b"), reporter=Quiet())
    a = load_file(str(tmp_path / "a" / "final" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "weights.safetensors"))
    assert "sparsity_coefficient" in a
    assert float(a["sparsity_coefficient"]) != float(cfg.options.to_dict()[COEFFICIENT[arch]])
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the saved SAE carries the adapted coefficient
    loaded = load_sae(tmp_path / "a" / "final")
    assert loaded.sparsity_coefficients()[COEFFICIENT[arch]] == pytest.approx(
        float(a["sparsity_coefficient"]))


@pytest.mark.parametrize("offset", [2.0, 0.0], ids=["resid_post-like", "mlp_out-like"])
def test_jumprelu_l0_moves_with_its_coefficient_at_any_hook_scale(offset):
    """A residual stream's norm is mostly its mean (b_dec removes it: small pre-activations);
    an MLP output's is not (large ones). The data-set initial thresholds make the L0 follow the
    coefficient on both (with a fixed 0.01 start it did not on hook_mlp_out)."""
    g = torch.Generator().manual_seed(7)
    x = sparse_data(4096, scale=40.0) + (offset - 2.0) * 40.0
    x = x + 4.0 * torch.randn(x.shape, generator=g)
    l0s = []
    for coefficient in (1e-3, 3e-2, 1.0):
        cfg = make_sae_config(d_in=D_IN, d_sae=D_SAE, architecture="jumprelu",
                              l0_coefficient=coefficient)
        result = train_sae(build_sae(cfg, seed=0), TensorSource(x), quiet(num_epochs=3),
                           val_source=TensorSource(x[:2048]), reporter=Quiet())
        l0s.append(result.final.l0)
    assert l0s[0] > l0s[1] > l0s[2], l0s
    assert l0s[0] > 1.5 * l0s[2], l0s
