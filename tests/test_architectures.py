"""The new architectures on hand-computed cases: TopK, JumpReLU (its straight-through
gradients), Matryoshka BatchTopK (its prefix reconstructions), and AuxK's detached residual.

The contract every registered architecture must meet (save/load, training, resume, end-to-end,
export) is tests/test_architecture_contract.py; BatchTopK's and the standard SAE's own hand cases
are in tests/test_sae_models.py.
"""

import pytest
import torch

from activation_cache import ConfigError
from trainer import JumpReLUSAE, MatryoshkaBatchTopKSAE, make_sae_config, TopKSAE, build_sae
from trainer.saes.jumprelu import JumpReLUFunction, StepFunction
from trainer.sparse_ops import prefix_decodes, topk_per_token_forward, topk_sae_forward

pytestmark = pytest.mark.usefixtures("one_thread")


def _set(sae, **tensors):
    """Overwrite parameters/buffers of ``sae`` with the given values."""
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(torch.as_tensor(value, dtype=getattr(sae, name).dtype))
    return sae


def _mark_dead(sae, latents):
    """Make ``latents`` dead for the AuxK loss (idle for n_batches_to_dead batches)."""
    with torch.no_grad():
        sae.num_batches_not_active[latents] = sae.cfg.n_batches_to_dead
    assert sae.dead_mask().nonzero().squeeze(1).tolist() == sorted(latents)


def _codes(out, n, d_sae):
    """Dense [n, d_sae] codes of a TopKForward (differentiable through ``out.values``)."""
    return torch.zeros(n, d_sae, dtype=out.values.dtype).index_put(
        (out.token_idx, out.latent_idx), out.values)


def _random_params(d_in, d_sae, seed, bias_shift=0.0):
    """float64 leaf tensors W_enc, b_enc, W_dec, b_dec (unit-norm decoder rows)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.t() + 0.3 * torch.randn(d_in, d_sae, generator=g, dtype=torch.float64)
    b_enc = 0.5 * torch.randn(d_sae, generator=g, dtype=torch.float64) + bias_shift
    b_dec = 0.2 * torch.randn(d_in, generator=g, dtype=torch.float64)
    return [t.clone().requires_grad_(True) for t in (W_enc, b_enc, W_dec, b_dec)]


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


# =============================================================================================
# TopK
# =============================================================================================

# d_in=2, d_sae=4, k=2, b_dec = 0, input scale 1:
#   pre = x @ [[1, 0, 1, -1], [0, 1, 1, 0]] + [0, 0, -0.5, 0] = [x0, x1, x0 + x1 - 0.5, -x0]
TOPK_X = torch.tensor([[3.0, 1.0], [-1.0, 0.2], [-1.0, -2.0], [0.0, -1.0]])
# pre: a [3, 1, 3.5, -3] -> keeps 3.5 and 3;    b [-1, 0.2, -1.3, 1] -> keeps 1 and 0.2;
#      c [-1, -2, -3.5, 1] -> top 2 is {1, -1}, only 1 is positive: one active latent;
#      d [0, -1, -1.5, 0] -> top 2 is {0, 0}: nothing positive, no active latent.
TOPK_F = torch.tensor([[3.0, 0.0, 3.5, 0.0], [0.0, 0.2, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0],
                       [0.0, 0.0, 0.0, 0.0]])


def _hand_topk(**kw) -> TopKSAE:
    sae = TopKSAE(make_sae_config(d_in=2, d_sae=4, architecture="topk", top_k=2, **kw), seed=0)
    return _set(sae, W_enc=[[1.0, 0.0, 1.0, -1.0], [0.0, 1.0, 1.0, 0.0]],
                b_enc=[0.0, 0.0, -0.5, 0.0],
                W_dec=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], b_dec=[0.0, 0.0])


def test_topk_hand_case_keeps_k_per_token_or_fewer_when_fewer_are_positive():
    sae = _hand_topk()
    assert torch.equal(sae.encode(TOPK_X), TOPK_F)
    for i in range(4):  # each token alone: the same code (no batch dependence)
        assert torch.equal(sae.encode(TOPK_X[i:i + 1]), TOPK_F[i:i + 1])
    out = topk_per_token_forward(TOPK_X, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, 2)
    assert out.token_idx.tolist() == [0, 0, 1, 1, 2]  # sorted by token, then latent
    assert out.latent_idx.tolist() == [0, 2, 1, 3, 3]
    assert torch.allclose(out.values.detach(), torch.tensor([3.0, 3.5, 0.2, 1.0, 1.0]))


def test_topk_training_forward_terms_hand_case():
    sae = _hand_topk().train()
    out = sae.training_forward(TOPK_X)
    # x_hat = f @ W_dec: a [3 + 2.1, 2.8] = [5.1, 2.8], b [-1, 0.2], c [-1, 0], d [0, 0]
    x_hat = torch.tensor([[5.1, 2.8], [-1.0, 0.2], [-1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(out.output, x_hat, atol=1e-6)
    # squared errors: a 2.1^2 + 1.8^2 = 7.65, b 0, c 2^2 = 4, d 1^2 = 1 -> 12.65 / 8 values
    assert out.reconstruction_loss.item() == pytest.approx(12.65 / 8, rel=1e-6)
    assert float(out.terms["mse"]) == pytest.approx(12.65 / 8, rel=1e-6)
    assert float(out.l0) == pytest.approx(5 / 4)  # 2 + 2 + 1 + 0 active latents
    assert out.fired.tolist() == [True, True, True, True]
    assert float(out.terms["aux"]) == 0.0 and out.sparsity_loss.item() == 0.0  # nothing dead
    assert out.running == {}  # no threshold, nothing to track


def test_topk_auxk_term_hand_case():
    sae = _hand_topk(top_k_aux=1, aux_penalty=0.5)
    _mark_dead(sae, [1])
    out = sae.training_forward(TOPK_X)
    # residual e = x - x_hat: a [-2.1, -1.8], b [0, 0], c [0, -2], d [0, -1]
    # dead latent 1: pre [1, 0.2, -2, -1] -> relu [1, 0.2, 0, 0]; e_hat = that x W_dec[1] = [0, 1]
    # ||e - e_hat||^2: a 2.1^2 + 2.8^2 = 12.25, b 0.2^2 = 0.04, c 4, d 1 -> mean 4.3225
    # mean(e) = [-0.525, -1.2]; ||e - mean(e)||^2: 2.840625, 1.715625, 0.915625, 0.315625
    #   -> mean 1.446875
    aux = 4.3225 / 1.446875
    assert float(out.terms["aux"]) == pytest.approx(aux, rel=1e-6)
    assert out.sparsity_loss.item() == pytest.approx(0.5 * aux, rel=1e-6)
    assert float(out.terms["mse"]) == pytest.approx(12.65 / 8, rel=1e-6)  # main term unchanged


def _dense_topk_per_token(x, W_enc, b_enc, W_dec, b_dec, k):
    """Plain autograd definition of per-token TopK: dense codes and reconstruction."""
    pre = (x - b_dec) @ W_enc + b_enc
    top = pre.topk(k, dim=1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    return codes, codes @ W_dec + b_dec


def test_topk_per_token_forward_equals_dense_autograd_in_values_and_gradients():
    n, d_in, d_sae, k = 40, 8, 32, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    params = _random_params(d_in, d_sae, seed=1, bias_shift=-1.2)  # many negative pre-acts
    G = torch.randn(n, d_in, generator=g, dtype=torch.float64)  # upstream gradient of x_hat
    H = torch.randn(n, d_sae, generator=g, dtype=torch.float64)  # and of the codes

    out = topk_per_token_forward(x, *params, k)
    codes = _codes(out, n, d_sae)
    ref_codes, ref_x_hat = _dense_topk_per_token(x, *params, k)
    per_token = (ref_codes > 0).sum(1)
    assert per_token.max() == k and per_token.min() < k  # some tokens have < k positive
    assert torch.equal(codes.detach() > 0, ref_codes.detach() > 0)
    torch.testing.assert_close(codes, ref_codes, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.x_hat, ref_x_hat, rtol=1e-12, atol=1e-12)
    ours = _grads((out.x_hat * G).sum() + (codes * H).sum(), params)
    ref = _grads((ref_x_hat * G).sum() + (ref_codes * H).sum(), params)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), ours, ref):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_topk_training_encoding_is_the_inference_encoding_and_batch_independent():
    sae = build_sae(make_sae_config(d_in=16, d_sae=64, architecture="topk", top_k=6), seed=3)
    x = torch.randn(200, 16) * 7 + 2
    sae.initialize_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    assert float(sae.input_scale) != 1.0
    sae.train()
    xs = sae.scale_input(x)
    train = topk_per_token_forward(xs, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, 6)
    train_codes = _codes(train, 200, 64).detach()
    infer = sae.encode(x)  # train mode: still the inference encoding
    assert torch.equal(train_codes > 0, infer > 0)
    torch.testing.assert_close(train_codes, infer, rtol=1e-6, atol=1e-6)
    # exactly k per token (these pre-activations have >= k positive entries per token)
    assert ((infer > 0).sum(1) == 6).all()
    # the training forward decodes that code
    out = sae.training_forward(x)
    torch.testing.assert_close(out.output, infer @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)
    assert float(out.l0) == 6.0
    # a token's code does not depend on the tokens it is encoded with
    for part in (slice(7, 8), slice(0, 13), slice(150, 200)):
        alone = sae.encode(x[part])
        assert torch.equal(alone > 0, infer[part] > 0)
        torch.testing.assert_close(alone, infer[part], rtol=1e-6, atol=1e-6)


# =============================================================================================
# JumpReLU
# =============================================================================================

# d_in = d_sae = 3, W_enc = I, biases 0, scale 1: z = x. theta = [0.5, 1, 2], bandwidth 0.2.
JR_X = torch.tensor([[0.55, 0.95, 1.5], [2.0, 1.15, 2.05]])
# u = (z - theta) / eps:  t0 [0.25, -0.25, -2.5]   t1 [7.5, 0.75, 0.25]
# H(z - theta):           t0 [1, 0, 0]             t1 [1, 1, 1]
# K(u) = 1[|u| < 1/2]:    t0 [1, 1, 0]             t1 [0, 0, 1]
# (t1's latent 1 is active but 0.75 bandwidths above theta: outside the window.)
JR_F = torch.tensor([[0.55, 0.0, 0.0], [2.0, 1.15, 2.05]])
JR_W_DEC = [[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]]


def _hand_jumprelu() -> JumpReLUSAE:
    sae = JumpReLUSAE(make_sae_config(d_in=3, d_sae=3, architecture="jumprelu", l0_coefficient=0.1,
                                jumprelu_bandwidth=0.2), seed=0)
    return _set(sae, W_enc=torch.eye(3), b_enc=[0.0] * 3, W_dec=JR_W_DEC, b_dec=[0.0] * 3,
                threshold=torch.tensor([0.5, 1.0, 2.0]))


def test_jumprelu_forward_and_l0_penalty_hand_case():
    sae = _hand_jumprelu().train()
    assert torch.allclose(sae.threshold, torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(sae.encode(JR_X), JR_F)
    out = sae.training_forward(JR_X)
    # x_hat: t0 0.55 W_dec[0] = [0.33, 0.44, 0]; t1 2 W_dec[0] + 1.15 W_dec[1] + 2.05 W_dec[2]
    #   = [1.2, 2.29, 2.97]; errors t0 [-0.22, -0.51, -1.5], t1 [-0.8, 1.14, 0.92]
    assert torch.allclose(out.output, torch.tensor([[0.33, 0.44, 0.0], [1.2, 2.29, 2.97]]))
    sse = 0.22**2 + 0.51**2 + 1.5**2 + 0.8**2 + 1.14**2 + 0.92**2  # 5.3445
    assert out.reconstruction_loss.item() == pytest.approx(sse / 6, rel=1e-6)
    # L0 penalty: mean over tokens of the active count, (1 + 3) / 2
    assert float(out.terms["l0_penalty"]) == pytest.approx(2.0)
    assert out.sparsity_loss.item() == pytest.approx(0.1 * 2.0)
    assert float(out.l0) == pytest.approx(2.0)
    assert out.fired.tolist() == [True, True, True]


def test_jumprelu_straight_through_gradients_hand_case():
    """The module docstring's estimators:
    df/dtheta = -(theta/eps) K(u), dH/dtheta = -(1/eps) K(u), df/dz = H(z - theta), dH/dz = 0."""
    sae = _hand_jumprelu().train()
    out = sae.training_forward(JR_X)

    # reconstruction: dmse/df[t, j] = (2 / 6) err[t] . W_dec[j]
    #   t0: [-0.54, -1.506, -1.5] / 3 = [-0.18, -0.502, -0.5]
    #   t1: [0.432, 1.42, 0.92] / 3 = [0.144, 0.47333, 0.30667]
    # dmse/dtheta[j] = sum_t dmse/df[t, j] * -(theta_j / eps) K[t, j]
    #   j0: -0.18 * -2.5 = 0.45;  j1: -0.502 * -5 = 2.51;  j2: 0.30667 * -10 = -3.0667
    out.reconstruction_loss.backward(retain_graph=True)
    expected = torch.tensor([0.45, 2.51, -0.92 / 3 * 10])
    assert torch.allclose(sae.threshold.grad, expected, rtol=1e-5, atol=1e-6)
    # df/dz = H(z - theta): db_enc[j] = sum_t dmse/df[t, j] H[t, j]; t0's latent 1 is inside
    # the window but inactive, and gets no gradient through z
    #   j0: -0.18 + 0.144 = -0.036;  j1: 0.47333;  j2: 0.30667
    assert torch.allclose(sae.b_enc.grad, torch.tensor([-0.036, 1.42 / 3, 0.92 / 3]),
                          rtol=1e-5, atol=1e-6)

    # the L0 penalty: dl0/dtheta[j] = mean_t -(1/eps) K[t, j] = [-2.5, -2.5, -2.5]
    # and nothing reaches z (dH/dz = 0)
    sae.zero_grad(set_to_none=True)
    (out.sparsity_loss / sae.cfg.l0_coefficient).backward()
    assert torch.allclose(sae.threshold.grad, torch.tensor([-2.5, -2.5, -2.5]), rtol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        grad = getattr(sae, name).grad
        assert grad is None or not grad.any(), name


def test_jumprelu_functions_gradients_with_respect_to_z():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 7, generator=g, dtype=torch.float64, requires_grad=True)
    theta = (torch.rand(7, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    upstream = torch.randn(50, 7, generator=g, dtype=torch.float64)
    f = JumpReLUFunction.apply(z, theta, 0.1)
    assert torch.equal(f.detach(), torch.relu(z.detach()) * (z.detach() > theta.detach()))
    dz, = torch.autograd.grad((f * upstream).sum(), z)
    assert torch.equal(dz, upstream * (z.detach() > theta.detach()))  # df/dz = H(z - theta)
    h = StepFunction.apply(z, theta, 0.1)
    assert torch.equal(h.detach(), (z.detach() > theta.detach()).double())
    dz, dtheta = torch.autograd.grad((h * upstream).sum(), (z, theta), allow_unused=True)
    assert dz is None or not dz.any()  # dH/dz = 0
    inside = ((z.detach() - theta.detach()) / 0.1).abs() < 0.5
    assert inside.any() and (~inside).any()
    assert torch.allclose(dtheta, (-(1 / 0.1) * inside * upstream).sum(0))


# =============================================================================================
# Matryoshka BatchTopK
# =============================================================================================


def test_matryoshka_prefix_widths_from_group_fractions():
    def widths(d_sae, **kw):
        cfg = make_sae_config(d_in=4, d_sae=d_sae, architecture="matryoshka_batchtopk", top_k=2, **kw)
        return build_sae(cfg).prefix_widths

    assert widths(4608) == (288, 1152, 4608)  # defaults 1/16, 3/16, 3/4
    assert widths(64) == (4, 16, 64)
    assert widths(10, group_fractions=[1 / 3, 1 / 3, 1 / 3]) == (3, 7, 10)  # rounded cumsums
    assert widths(8, group_fractions=[1.0]) == (8,)  # one group: plain BatchTopK
    with pytest.raises(ConfigError, match="group_fractions: gives an empty group at d_sae=4"):
        widths(4)  # 4 / 16 rounds to 0
    with pytest.raises(ConfigError, match="group_fractions: must sum to 1"):
        widths(8, group_fractions=[0.5, 0.25])


def _dense_batch_topk(x, W_enc, b_enc, W_dec, b_dec, k):
    """Plain autograd BatchTopK codes [N, d_sae]: the top k x N ReLU'd pre-activations."""
    acts = torch.relu((x - b_dec) @ W_enc + b_enc)
    flat = acts.reshape(-1)
    top = flat.detach().topk(k * x.shape[0]).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[top] = True
    return (flat * mask).reshape_as(acts)


def test_prefix_decodes_equal_dense_prefix_reconstructions_in_values_and_gradients():
    n, d_in, d_sae, k = 30, 8, 32, 4
    widths = (3, 10, 20, 32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    params = _random_params(d_in, d_sae, seed=2)
    W_enc, b_enc, W_dec, b_dec = params
    G = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for _ in widths]

    out = topk_sae_forward(x, *params, k)
    recons = prefix_decodes(out, W_dec, b_dec, widths)
    assert recons[-1] is out.x_hat  # the last prefix is the whole dictionary
    codes = _dense_batch_topk(x, *params, k)
    ref = [codes[:, :w] @ W_dec[:w] + b_dec for w in widths]
    for w, a, b in zip(widths, recons, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"prefix {w}")
    # every prefix really differs from the next (each group holds selected latents)
    assert all(not torch.allclose(a, b) for a, b in zip(ref, ref[1:]))
    ours = _grads(sum((r * gi).sum() for r, gi in zip(recons, G)), params)
    theirs = _grads(sum((r * gi).sum() for r, gi in zip(ref, G)), params)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), ours, theirs):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_matryoshka_reconstruction_loss_is_the_mean_of_the_prefix_mses_hand_case():
    cfg = make_sae_config(d_in=2, d_sae=4, architecture="matryoshka_batchtopk", top_k=2,
                    group_fractions=[0.25, 0.25, 0.5])
    sae = _set(MatryoshkaBatchTopKSAE(cfg, seed=0),
               W_enc=[[1.0, 0.0, 1.0, -1.0], [0.0, 1.0, 1.0, 0.0]], b_enc=[0.0, 0.0, -0.5, 0.0],
               W_dec=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], b_dec=[0.0, 0.0]).train()
    assert sae.prefix_widths == (1, 2, 4)
    x = torch.tensor([[3.0, 1.0], [-1.0, 0.2]])
    out = sae.training_forward(x)
    # ReLU'd pre-acts: a [3, 1, 3.5, 0], b [0, 0.2, 0, 1]; the batch keeps 2 x 2 = 4:
    # 3.5, 3, 1 (a) and 1 (b); 0.2 is cut. Codes a [3, 1, 3.5, 0], b [0, 0, 0, 1].
    # prefix 1 (latent 0):   a [3, 0], b [0, 0]     errors a [0, -1], b [1, -0.2]  SSE 2.04
    # prefix 2 (latents <2): a [3, 1], b [0, 0]     errors a [0, 0],  b [1, -0.2]  SSE 1.04
    # all 4:                 a [5.1, 3.8], b [-1, 0] errors a [2.1, 2.8], b [0, -0.2] SSE 12.29
    mses = [2.04 / 4, 1.04 / 4, 12.29 / 4]
    assert float(out.terms["mse_prefix_1"]) == pytest.approx(mses[0], rel=1e-6)
    assert float(out.terms["mse_prefix_2"]) == pytest.approx(mses[1], rel=1e-6)
    assert float(out.terms["mse"]) == pytest.approx(mses[2], rel=1e-6)
    assert out.reconstruction_loss.item() == pytest.approx(sum(mses) / 3, rel=1e-6)
    assert torch.allclose(out.output, torch.tensor([[5.1, 3.8], [-1.0, 0.0]]))  # full x_hat
    assert float(out.l0) == 2.0 and float(out.running["min_selected"]) == 1.0
    assert out.sparsity_loss.item() == 0.0  # nothing dead: no AuxK


# =============================================================================================
# AuxK: the residual is detached
# =============================================================================================


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_auxk_gradient_reaches_only_the_dead_latents(arch):
    """The AuxK term reconstructs the *detached* residual: the live latents' encoder columns,
    encoder biases and decoder rows (the main reconstruction) get no gradient from it."""
    cfg = make_sae_config(d_in=16, d_sae=64, architecture=arch, top_k=4, top_k_aux=8,
                    aux_penalty=0.5)
    sae = build_sae(cfg, seed=0).train()
    dead = list(range(0, 64, 3))
    _mark_dead(sae, dead)
    live = torch.ones(64, dtype=torch.bool)
    live[dead] = False
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    out = sae.training_forward(x)
    assert float(out.terms["aux"]) > 0
    # live latents the main encoding selected: a residual that is not detached would pull them
    selected_live = out.fired & live
    assert selected_live.sum() >= 10
    out.sparsity_loss.backward()
    assert not sae.W_dec.grad[live].any() and sae.W_dec.grad[~live].abs().sum() > 0
    assert not sae.W_enc.grad[:, live].any() and sae.W_enc.grad[:, ~live].abs().sum() > 0
    assert not sae.b_enc.grad[live].any() and sae.b_enc.grad[~live].abs().sum() > 0
