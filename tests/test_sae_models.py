"""SAE / BatchTopKSAE math on small hand-computed cases, folding, save/load."""

import json

import pytest
import torch

from trainer import (SAE, BatchTopKSAE, CheckpointMismatchError, DimensionMismatchError,
                     StandardSAE, TrainingProgress, build_sae, load_sae,
                     make_sae_config)
from trainer.saes.auxk import auxk_loss
from trainer.saes.base import geometric_median


def _train_codes(sae, x):
    """The training encoding (BatchTopK over the whole batch) as dense codes shaped like x."""
    xs = sae.scale_input(x).reshape(-1, sae.cfg.d_in)
    out = sae.selection(xs)
    dense = torch.zeros(xs.shape[0], sae.cfg.d_sae)
    dense[out.token_idx, out.latent_idx] = out.values.detach()
    return dense.reshape(*x.shape[:-1], sae.cfg.d_sae)


def _arch_kwargs(arch):
    return {"standard": {}, "jumprelu": {}}.get(arch, {"top_k": 4})


def _hand_topk_sae(k=2, **kw) -> BatchTopKSAE:
    """d_in=2, d_sae=3: pre = x @ [[1,0,1],[0,1,1]] + [0,0,-0.5] (b_dec = 0, scale 1)."""
    sae = BatchTopKSAE(make_sae_config(d_in=2, d_sae=3, top_k=k, **kw), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.zero_()
    return sae


X_HAND = torch.tensor([[3.0, 1.0], [0.5, 0.2]])
# pre-acts: token0 [3, 1, 3.5] (bias -0.5 included), token1 [0.5, 0.2, 0.2]; top 2*2=4 of the
# whole batch: 3.5, 3, 1, 0.5 -> token0 keeps 3 latents, token1 one.
F_HAND = torch.tensor([[3.0, 1.0, 3.5], [0.5, 0.0, 0.0]])


def test_batchtopk_keeps_top_k_times_tokens_over_the_whole_batch_2d_and_3d():
    sae = _hand_topk_sae().train()
    assert torch.equal(_train_codes(sae, X_HAND), F_HAND)
    f3 = _train_codes(sae, X_HAND.reshape(1, 2, 2))
    assert f3.shape == (1, 2, 3)
    assert torch.equal(f3.reshape(2, 3), F_HAND)
    # 3-D with two sequences: the budget is shared over all 4 tokens, not per sequence
    x4 = torch.cat([X_HAND, X_HAND * 0.1]).reshape(2, 2, 2)
    f4 = _train_codes(sae, x4).reshape(4, 3)
    # pre-acts of the second sequence: [0.3, 0.1, -0.15] and [0.05, 0.02, -0.43]; the top 8 of
    # the batch are 3.5, 3, 1, 0.5, 0.3, 0.2, 0.2, 0.1 (a per-sequence top-4 would differ)
    expected = torch.tensor([[3.0, 1.0, 3.5], [0.5, 0.2, 0.2], [0.3, 0.1, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(f4, expected) and torch.equal(f4 > 0, expected > 0)


def test_batchtopk_training_forward_terms():
    sae = _hand_topk_sae().train()
    out = sae.training_forward(X_HAND)
    x_hat = F_HAND @ sae.W_dec.detach()
    assert torch.allclose(out.output, x_hat)
    assert torch.allclose(out.reconstruction_loss, (x_hat - X_HAND).pow(2).mean())
    assert torch.allclose(out.terms["mse"], (x_hat - X_HAND).pow(2).mean())
    assert out.fired.tolist() == [True, True, True]
    assert float(out.l0) == 2.0
    assert float(out.terms["aux"]) == 0.0 and float(out.sparsity_loss) == 0.0  # nothing dead
    assert float(out.running["min_selected"]) == 0.5
    # no hidden state: a second forward returns its own statistics, the SAE is unchanged
    again = sae.training_forward(X_HAND[:1])
    assert float(again.running["min_selected"]) == 3.0  # token0 alone keeps 3.5 and 3
    assert float(sae.threshold) == -1.0


def test_eval_mode_encodes_each_token_independently_of_its_batch():
    sae = _hand_topk_sae()
    sae.threshold.fill_(0.9)
    sae.eval()
    batch = sae.encode(X_HAND)
    # JumpReLU(theta=0.9): token0 [3, 1, 3.5] all > 0.9; token1 [0.5, 0.2, 0.2] none
    assert torch.equal(batch, torch.tensor([[3.0, 1.0, 3.5], [0.0, 0.0, 0.0]]))
    for i in range(2):
        assert torch.equal(sae.encode(X_HAND[i : i + 1]), batch[i : i + 1])
    # and on random data with a bigger SAE
    big = BatchTopKSAE(make_sae_config(d_in=16, d_sae=64, top_k=4), seed=1)
    big.threshold.fill_(0.3)
    big.eval()
    x = torch.randn(50, 16)
    full = big.encode(x)
    for part in (slice(7, 8), slice(0, 10)):
        alone = big.encode(x[part])  # GEMM blocking may differ in the last bit, codes may not
        assert torch.equal(alone > 0, full[part] > 0)
        assert torch.allclose(alone, full[part], rtol=1e-6, atol=1e-6)


def test_threshold_is_an_fp32_ema_of_the_min_selected_activation_after_warmup():
    sae = _hand_topk_sae(threshold_warmup_steps=2, threshold_beta=0.5)
    assert sae.threshold.dtype == torch.float32 and float(sae.threshold) == -1.0
    fired = torch.ones(3, dtype=torch.bool)
    two, four = {"min_selected": torch.tensor(2.0)}, {"min_selected": torch.tensor(4.0)}
    # the rule reads the SAE's own options: warm-up 2 steps (capped at half the run), beta 0.5
    assert (sae.cfg.threshold_warmup_steps, sae.cfg.threshold_beta) == (2, 0.5)
    sae.update_training_state(fired, two, TrainingProgress(step=2, total_steps=100))
    assert float(sae.threshold) == -1.0  # still in warm-up (steps 1 and 2)
    sae.update_training_state(fired, two, TrainingProgress(step=3, total_steps=100))
    assert float(sae.threshold) == 2.0  # first value is taken as is
    sae.update_training_state(fired, four, TrainingProgress(step=4, total_steps=100))
    assert float(sae.threshold) == 3.0  # 0.5 * 2 + 0.5 * 4
    sae.update_training_state(fired, {}, TrainingProgress(step=5, total_steps=100))
    assert float(sae.threshold) == 3.0  # a step without a forward brings no minimum
    # the warm-up is capped at half the run: in a 2-step run the EMA starts at step 2
    capped = _hand_topk_sae(threshold_warmup_steps=2, threshold_beta=0.5)
    capped.update_training_state(fired, two, TrainingProgress(step=1, total_steps=2))
    assert float(capped.threshold) == -1.0
    capped.update_training_state(fired, four, TrainingProgress(step=2, total_steps=2))
    assert float(capped.threshold) == 4.0
    # the chunks of one step merge to their minimum (end-to-end training's micro-batches)
    assert float(sae.merge_running(two, four)["min_selected"]) == 2.0


def test_calibrated_threshold_gives_inference_l0_of_k():
    sae = BatchTopKSAE(make_sae_config(d_in=16, d_sae=64, top_k=5), seed=2)
    x = torch.randn(300, 16)
    message = sae.calibrate(iter([x[:100], x[100:200], x[200:]]), max_tokens=300)
    assert message is not None and float(sae.threshold) > 0
    sae.eval()
    assert int((sae.encode(x) > 0).sum()) == 5 * 300
    # one batch of huge-norm tokens holds most of the global top: still exact
    skewed = torch.cat([x[:100] * 50, x[100:]])
    sae.calibrate(iter([skewed[:100], skewed[100:200], skewed[200:]]), max_tokens=300,
                  chunk_candidates=1)
    assert int((sae.encode(skewed) > 0).sum()) == 5 * 300


def test_auxk_hand_case():
    sae = _hand_topk_sae(k=1, top_k_aux=1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.6], [0.0, 1.0, 0.8]]))
        sae.b_enc.zero_()
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    x_recon = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    dead = torch.tensor([False, False, True])
    # residual e = [[0, 2], [0, 0]]; dead pre-acts [2.2, -0.6] -> relu [2.2, 0]
    # e_hat = [[1.32, 1.76], [0, 0]]; ||e - e_hat||^2 = [1.8, 0] -> mean 0.9
    # mean(e) = [0, 1]; ||e - mean||^2 = [1, 1] -> mean 1  => aux = 0.9
    aux = auxk_loss(sae, x, x, x_recon, sae.pre_activations(x).detach(), dead)
    assert float(aux.detach()) == pytest.approx(0.9, rel=1e-6)
    aux.backward()
    # gradients reach only the dead latent's encoder column and decoder row
    assert sae.W_dec.grad[:2].abs().sum() == 0 and sae.W_dec.grad[2].abs().sum() > 0
    assert sae.W_enc.grad[:, :2].abs().sum() == 0 and sae.W_enc.grad[:, 2].abs().sum() > 0


def test_auxk_is_zero_without_dead_latents_and_scale_free():
    sae = BatchTopKSAE(make_sae_config(d_in=16, d_sae=64, top_k=4, top_k_aux=8), seed=3)
    x = torch.randn(40, 16)
    x_recon = x + 0.3 * torch.randn(40, 16)
    none_dead = torch.zeros(64, dtype=torch.bool)
    pre = sae.pre_activations(x).detach()
    assert float(auxk_loss(sae, x, x, x_recon, pre, none_dead)) == 0.0
    assert float(auxk_loss(sae, x, x, x_recon, pre)) == 0.0  # fresh counters: nothing dead
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    a1 = auxk_loss(sae, x, x, x_recon, pre, dead)
    a10 = auxk_loss(sae, 10 * x, 10 * x, 10 * x_recon, 10 * pre, dead)  # b_enc = b_dec = 0: linear
    assert float(a1.detach()) > 0
    assert float(a10.detach()) == pytest.approx(float(a1.detach()), rel=1e-5)


def test_dead_latents_after_n_batches_to_dead():
    sae = BatchTopKSAE(make_sae_config(d_in=2, d_sae=3, top_k=1, n_batches_to_dead=2), seed=0)
    sae.update_inactive_features(torch.tensor([True, False, False]))
    assert sae.num_batches_not_active.tolist() == [0, 1, 1]
    assert sae.dead_mask().tolist() == [False, False, False]
    sae.update_inactive_features(torch.tensor([False, True, False]))
    assert sae.num_batches_not_active.tolist() == [1, 0, 2]
    assert sae.dead_mask().tolist() == [False, False, True]
    assert sae.count_dead_features() == 1  # latent 2 never fired
    assert sae.dead_feature_percentage() == pytest.approx(100 / 3)
    # dense activations are accepted too
    sae.update_inactive_features(torch.tensor([[0.0, 0.0, 2.0]]))
    assert sae.num_batches_not_active.tolist() == [2, 1, 0]


def test_decoder_gradient_projection_and_renormalisation_hand_case():
    sae = StandardSAE(make_sae_config(d_in=2, d_sae=2, architecture="standard"), seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    sae.W_dec.grad = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    sae.project_decoder_gradients()
    # row 0: g - (g.w) w = [1, 0] - 0.6 [0.6, 0.8] = [0.64, -0.48]; row 1: [3, 4] - 3 [1, 0]
    assert torch.allclose(sae.W_dec.grad, torch.tensor([[0.64, -0.48], [0.0, 4.0]]))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec, torch.tensor([[0.6, 0.8], [0.0, -1.0]]))


def test_vanilla_sae_relu_l1_hand_case():
    sae = StandardSAE(make_sae_config(d_in=2, d_sae=2, architecture="standard"), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
    x = torch.tensor([[1.0, -2.0], [3.0, 2.0]])
    out = sae.training_forward(x)
    # f = relu(x) = [[1, 0], [3, 2]]; L1 = mean(1, 5) = 3; x_hat = f; mse = (0+4+0+0)/4 = 1
    assert out.terms["l1"].item() == pytest.approx(3.0)
    assert out.terms["mse"].item() == pytest.approx(1.0)
    assert out.sparsity_loss.item() == pytest.approx(3.0 * sae.cfg.l1_coefficient)
    assert out.fired.tolist() == [True, True]
    assert float(out.l0) == pytest.approx(1.5)
    x_recon, feats = sae(x)
    assert torch.equal(feats, torch.tensor([[1.0, 0.0], [3.0, 2.0]]))


def test_geometric_median_and_data_initialisation():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]]).double()
    assert torch.allclose(geometric_median(pts), torch.tensor([2.0, 0.0]).double(), atol=1e-3)
    sae = StandardSAE(make_sae_config(d_in=2, d_sae=4, architecture="standard"), seed=0)
    sae.initialize_from_data(pts.float(), b_dec_init="mean", scale_inputs=False)
    assert torch.allclose(sae.b_dec, torch.tensor([21.2, 0.0]))
    x = torch.randn(500, 2) * 7 + 3
    sae.initialize_from_data(x, b_dec_init="geometric_median", scale_inputs=True)
    assert sae.input_scale.dtype == torch.float32
    scaled_norm = (x * sae.input_scale).norm(dim=1).mean()
    assert float(scaled_norm) == pytest.approx(2 ** 0.5, rel=1e-5)  # E||x|| = sqrt(d_in)


@pytest.mark.parametrize("arch", ["batchtopk", "standard"])
def test_folding_keeps_raw_input_outputs(arch):
    sae = build_sae(make_sae_config(d_in=16, d_sae=64, architecture=arch, **_arch_kwargs(arch)), seed=4)
    x = torch.randn(64, 16) * 30 + 5
    sae.initialize_from_data(x)
    assert float(sae.input_scale) != 1.0
    if arch == "batchtopk":
        sae.threshold.fill_(0.2)
    sae.eval()
    before_recon, before_f = sae(x)
    folded = sae.folded_copy()
    assert float(folded.input_scale) == 1.0 and float(sae.input_scale) != 1.0
    after_recon, after_f = folded(x)
    assert torch.allclose(after_f, before_f, rtol=1e-4, atol=1e-5)
    assert torch.equal(after_f > 0, before_f > 0)
    assert torch.allclose(after_recon, before_recon, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("arch, klass", [("batchtopk", BatchTopKSAE), ("standard", StandardSAE)])
def test_save_and_load_rebuild_the_right_class(tmp_path, arch, klass):
    sae = build_sae(make_sae_config(d_in=16, d_sae=64, architecture=arch, **_arch_kwargs(arch)), seed=5)
    x = torch.randn(32, 16) * 4
    sae.initialize_from_data(x)
    if arch == "batchtopk":
        sae.threshold.fill_(0.1)
    sae.eval()
    history = [{"step": 1, "tokens_seen": 10}]
    sae.save(tmp_path / "s", history=history)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "config.json", "history.json", "weights.safetensors"]
    loaded = load_sae(tmp_path / "s")
    assert type(loaded) is klass
    loaded.eval()
    assert float(loaded.input_scale) == 1.0  # folded at save
    assert torch.allclose(loaded(x)[0], sae(x)[0], rtol=1e-4, atol=1e-4)
    same, hist = load_sae(tmp_path / "s", load_history=True)
    assert type(same) is klass and hist == history


def test_wrong_d_in_and_mismatched_weights_are_clear_errors(tmp_path):
    sae = build_sae(make_sae_config(d_in=8, d_sae=32, top_k=4), seed=0)
    with pytest.raises(DimensionMismatchError, match=r"width 5.*d_in=8"):
        sae.encode(torch.randn(3, 5))
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    cfg["d_sae"] = 16
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"W_enc has shape \[8, 32\].*d_sae=16"):
        load_sae(tmp_path / "s")
    with pytest.raises(CheckpointMismatchError, match="does not exist"):
        load_sae(tmp_path / "nothing")
    cfg["d_sae"] = 32
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "s" / "weights.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointMismatchError, match="weights.safetensors: not a readable"):
        load_sae(tmp_path / "s")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_device_on_a_cpu_machine(tmp_path):
    from activation_cache import ConfigError
    with pytest.raises(ConfigError, match="SAEConfig.device: 'cuda' but CUDA is not available"):
        build_sae(make_sae_config(d_in=8, d_sae=32, top_k=4, device="cuda"))
    sae = build_sae(make_sae_config(d_in=8, d_sae=32, top_k=4), seed=0)
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    cfg["device"] = "cuda"  # as if saved on a GPU machine
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    assert load_sae(tmp_path / "s").W_enc.device.type == "cpu"


def test_float64_sae_keeps_its_precision_through_the_scaling():
    sae = build_sae(make_sae_config(d_in=8, d_sae=32, top_k=4, dtype="float64"), seed=0)
    x = torch.randn(16, 8, dtype=torch.float64) * 10
    sae.initialize_from_data(x)
    xs = sae.scale_input(x)
    assert xs.dtype == torch.float64
    assert torch.equal(xs, x * sae.input_scale.double())
