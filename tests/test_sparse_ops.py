"""The sparse BatchTopK kernels equal their dense definitions (outputs, gradients, selection)."""

from __future__ import annotations

import pytest
import torch

from trainer import sparse_ops
from trainer.sparse_ops import (
    auxk_reconstruct,
    auxk_reconstruct_reference,
    batch_topk_indices,
    topk_sae_forward,
    topk_sae_forward_reference,
)

PARAMS = ("x", "W_enc", "b_enc", "W_dec", "b_dec")


def make_inputs(n, d_in, d_sae, *, seed=0, skew=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype) + 0.5
    if skew:  # a few huge-norm tokens, as real residual streams have (BOS, attention sinks)
        x[: max(1, n // 32)] *= 40.0
    W_enc = torch.randn(d_in, d_sae, generator=g, dtype=dtype) / d_in**0.5
    b_enc = 0.1 * torch.randn(d_sae, generator=g, dtype=dtype)
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=dtype) / d_in**0.5
    b_dec = 0.1 * torch.randn(d_in, generator=g, dtype=dtype)
    return [x, W_enc, b_enc, W_dec, b_dec]


def leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def topk_set(pre, m):
    """The reference index set: torch.topk over the flat ReLU'd tensor, positives only."""
    flat = torch.relu(pre).reshape(-1)
    top = torch.topk(flat, min(m, flat.numel()))
    return set(top.indices[top.values > 0].tolist())


def assert_forward_and_grads_match(inputs, k, *, rtol=1e-4, atol=1e-5):
    fast_in, ref_in = leaves(inputs), leaves(inputs)
    fast = topk_sae_forward(*fast_in, k)
    ref = topk_sae_forward_reference(*ref_in, k)
    assert torch.equal(fast.token_idx, ref.token_idx)
    assert torch.equal(fast.latent_idx, ref.latent_idx)
    torch.testing.assert_close(fast.values, ref.values, rtol=rtol, atol=atol)
    torch.testing.assert_close(fast.x_hat, ref.x_hat, rtol=rtol, atol=atol)
    torch.testing.assert_close(fast.pre_acts, ref.pre_acts, rtol=rtol, atol=atol)
    assert not fast.pre_acts.requires_grad
    # a loss that uses both the reconstruction and the selected values
    target = torch.randn_like(inputs[0])
    for out in (fast, ref):
        ((out.x_hat - target).pow(2).sum() + 0.3 * out.values.pow(2).sum()).backward()
    for name, a, b in zip(PARAMS, fast_in, ref_in):
        scale = b.grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.grad / scale, b.grad / scale, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    return fast


def test_hand_computed_case():
    # identity encoder/decoder, zero biases: pre = x; top k*N = 2 of the 6 entries.
    x = torch.tensor([[3.0, -1.0, 0.5], [2.0, 4.0, -2.0]])
    eye = torch.eye(3)
    out = topk_sae_forward(x, eye, torch.zeros(3), eye, torch.zeros(3), k=1)
    # the two largest are 4.0 at (1, 1) and 3.0 at (0, 0)
    assert out.token_idx.tolist() == [0, 1]
    assert out.latent_idx.tolist() == [0, 1]
    assert out.values.tolist() == [3.0, 4.0]
    assert out.x_hat.tolist() == [[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]
    # with b_dec = 1: pre = x - 1 (2.0 at (0,0), 3.0 at (1,1)); x_hat adds b_dec back
    one = torch.ones(3)
    out = topk_sae_forward(x, eye, torch.zeros(3), eye, one, k=1)
    assert out.values.tolist() == [2.0, 3.0]
    assert out.x_hat.tolist() == [[3.0, 1.0, 1.0], [1.0, 4.0, 1.0]]


@pytest.mark.parametrize(
    "n,d_in,d_sae,k,skew",
    [(64, 16, 96, 4, False), (64, 16, 96, 4, True), (1, 8, 32, 5, False), (37, 12, 50, 3, True)],
)
def test_matches_dense_reference(n, d_in, d_sae, k, skew):
    inputs = make_inputs(n, d_in, d_sae, seed=n + d_sae, skew=skew)
    out = assert_forward_and_grads_match(inputs, k)
    assert out.values.numel() == k * n  # plenty of positives here: the batch budget is full
    if skew:  # the huge-norm tokens take more than their share of the batch budget
        heavy = max(1, n // 32)
        assert (out.token_idx < heavy).sum() > k * heavy


def test_sampled_threshold_path_matches_reference(monkeypatch):
    # force the sample-estimated threshold (and its retries) on a test-sized batch
    monkeypatch.setattr(sparse_ops, "_SAMPLE_SIZE", 512)
    for skew in (False, True):
        inputs = make_inputs(96, 16, 128, seed=3, skew=skew)
        assert_forward_and_grads_match(inputs, 6)
    monkeypatch.setattr(sparse_ops, "_MARGIN_SIGMAS", -8.0)  # estimate too high: retry lower
    assert_forward_and_grads_match(make_inputs(96, 16, 128, seed=4, skew=True), 6)


def test_fewer_positives_than_budget_keeps_all_positives():
    # mostly negative pre-activations: k*N exceeds the positives, zeros are never kept
    inputs = make_inputs(20, 8, 40, seed=5)
    inputs[2] = inputs[2] - 3.0  # b_enc pushes almost everything below zero
    out = assert_forward_and_grads_match(inputs, 10)
    pre = out.pre_acts
    assert out.values.numel() == int((pre > 0).sum()) < 10 * 20
    assert bool((out.values > 0).all())


def test_all_nonpositive_selects_nothing():
    x = torch.zeros(4, 3)
    W_enc, W_dec = torch.randn(3, 5), torch.randn(5, 3)
    out = topk_sae_forward(x, W_enc, torch.zeros(5), W_dec, torch.zeros(3), k=2)
    assert out.values.numel() == 0
    assert torch.equal(out.x_hat, torch.zeros(4, 3))


def test_ties_at_the_cut_go_to_the_lowest_flat_index():
    pre = torch.tensor([[1.0, 5.0, 2.0, 2.0], [2.0, 0.0, 2.0, -1.0]])
    idx = batch_topk_indices(pre, 3)  # 5.0, then two of the four 2.0s
    assert idx.tolist() == [1, 2, 3]
    vals = pre.reshape(-1)[idx]
    ref_vals = torch.topk(pre.reshape(-1), 3).values
    assert sorted(vals.tolist()) == sorted(ref_vals.tolist())
    # and through the whole kernel with identity weights
    eye = torch.eye(4)
    out = topk_sae_forward(pre, eye, torch.zeros(4), eye, torch.zeros(4), k=2)  # M = 4
    assert list(zip(out.token_idx.tolist(), out.latent_idx.tolist())) == [
        (0, 1), (0, 2), (0, 3), (1, 0)
    ]


@pytest.mark.parametrize("kind", ["gaussian", "skewed", "cauchy", "many_ties"])
@pytest.mark.parametrize("sample_size", [None, 256])
def test_selection_equals_flat_topk(kind, sample_size):
    g = torch.Generator().manual_seed(11)
    n, d_sae, k = 200, 160, 7
    if kind == "gaussian":
        pre = torch.randn(n, d_sae, generator=g)
    elif kind == "skewed":
        pre = torch.randn(n, d_sae, generator=g)
        pre[:3] *= 100.0  # three tokens own most of the budget
    elif kind == "cauchy":
        pre = torch.empty(n, d_sae).cauchy_(generator=g)
    else:  # quantised values: many exact ties, none at the cut by construction below
        pre = torch.randint(-50, 50, (n, d_sae), generator=g).float()
    m = k * n
    idx = batch_topk_indices(pre, m, sample_size=sample_size)
    assert torch.equal(idx, idx.sort().values)
    assert idx.unique().numel() == idx.numel()
    flat = pre.reshape(-1)
    if kind == "many_ties":  # the set is ambiguous only at the cut value: compare the values
        ref = torch.topk(torch.relu(flat), m).values
        assert sorted(flat[idx].tolist()) == sorted(ref[ref > 0].tolist())
    else:
        assert set(idx.tolist()) == topk_set(pre, m)


def test_selection_retry_and_fallback_stay_exact():
    g = torch.Generator().manual_seed(2)
    pre = torch.randn(300, 100, generator=g)
    pre[:2] *= 1000.0
    m = 4 * 300
    # a margin this negative puts the first threshold far above the cut: retry, then fallback
    for margin in (-5.0, -1e6):
        idx = batch_topk_indices(pre, m, sample_size=1000, margin=margin)
        assert set(idx.tolist()) == topk_set(pre, m)


def test_selection_leaves_global_rng_alone():
    pre = torch.randn(300, 100)
    state = torch.get_rng_state()
    a = batch_topk_indices(pre, 600, sample_size=500)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, batch_topk_indices(pre, 600, sample_size=500))


def test_gradcheck_float64(auxk_path):
    inputs = make_inputs(6, 4, 10, seed=9, dtype=torch.float64)
    xs = leaves(inputs)

    def f(*args):
        out = topk_sae_forward(*args, k=2)
        return out.x_hat, out.values

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-6)

    dead = torch.tensor([True, False] * 5)

    def g(*args):
        x, W_enc, b_enc, _, b_dec = args
        pre = ((x - b_dec) @ W_enc + b_enc).detach()  # as the main kernel hands it over
        out = auxk_reconstruct(*args, pre_acts=pre, dead_mask=dead, k_aux=2)
        return out.e_hat, out.values

    assert torch.autograd.gradcheck(g, leaves(inputs), eps=1e-6, atol=1e-6)


def test_bad_shapes_raise():
    x, W_enc, b_enc, W_dec, b_dec = make_inputs(4, 3, 5)
    with pytest.raises(ValueError, match="flat batch"):
        topk_sae_forward(x[None], W_enc, b_enc, W_dec, b_dec, 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        topk_sae_forward(x, W_enc, b_enc, W_dec.t(), b_dec, 1)
    with pytest.raises(ValueError, match="dead_mask"):
        auxk_reconstruct(x, W_enc, b_enc, W_dec, b_dec, torch.zeros(4, 5), torch.ones(5), 2)


# --------------------------------------------------------------------------------------------
# AuxK
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["pairs", "dead_columns"])
def auxk_path(request, monkeypatch):
    """Run an AuxK test through the selected-pairs path and through the dead-columns GEMMs."""
    monkeypatch.setattr(sparse_ops, "_AUXK_DENSE_DENSITY", 2.0 if request.param == "pairs" else 0.0)
    return request.param


@pytest.mark.parametrize("k_aux,skew", [(3, False), (3, True), (100, False), (1, True)])
def test_auxk_matches_dense_reference(k_aux, skew, auxk_path):
    inputs = make_inputs(48, 12, 64, seed=k_aux, skew=skew)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True  # 22 dead latents; k_aux=100 takes every positive one
    fast_in, ref_in = leaves(inputs), leaves(inputs)
    main = topk_sae_forward(*fast_in, 4)
    aux = auxk_reconstruct(*fast_in, main.pre_acts, dead, k_aux)
    e_ref = auxk_reconstruct_reference(*ref_in, dead, k_aux)
    torch.testing.assert_close(aux.e_hat, e_ref, rtol=1e-4, atol=1e-4)
    assert bool(dead[aux.latent_idx].all()) and bool((aux.values > 0).all())
    assert int(torch.bincount(aux.token_idx, minlength=48).max()) <= k_aux
    residual = torch.randn(48, 12)
    (aux.e_hat - residual).pow(2).sum().backward()
    (e_ref - residual).pow(2).sum().backward()
    for name, a, b in zip(PARAMS, fast_in, ref_in):
        scale = b.grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.grad / scale, b.grad / scale, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def test_auxk_hand_computed(auxk_path):
    # identity weights: pre = x; latents 0 and 2 are dead; k_aux = 1 per token
    x = torch.tensor([[1.0, 9.0, 3.0], [-1.0, 2.0, -4.0]])
    eye = torch.eye(3)
    dead = torch.tensor([True, False, True])
    aux = auxk_reconstruct(x, eye, torch.zeros(3), eye, torch.zeros(3), x, dead, 1)
    # token 0: dead pre-acts 1.0 and 3.0 -> keeps latent 2; token 1: both negative -> nothing
    assert aux.token_idx.tolist() == [0] and aux.latent_idx.tolist() == [2]
    assert aux.e_hat.tolist() == [[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]


def test_auxk_without_dead_latents_is_zero(auxk_path):
    x, W_enc, b_enc, W_dec, b_dec = make_inputs(8, 4, 6)
    pre = (x - b_dec) @ W_enc + b_enc
    aux = auxk_reconstruct(x, W_enc, b_enc, W_dec, b_dec, pre, torch.zeros(6, dtype=torch.bool), 3)
    assert torch.equal(aux.e_hat, torch.zeros(8, 4)) and aux.values.numel() == 0


# -- a transcoder's shapes: d_out != d_in, no input centring ---------------------------------


def _transcoder_inputs(n, d_in, d_out, d_sae, seed=0):
    x, W_enc, b_enc, _, _ = make_inputs(n, d_in, d_sae, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    W_dec = torch.randn(d_sae, d_out, generator=g) / d_out**0.5
    b_dec = 0.1 * torch.randn(d_out, generator=g)
    return [x, W_enc, b_enc, W_dec, b_dec]


@pytest.mark.parametrize("kernel, reference", [
    (topk_sae_forward, topk_sae_forward_reference),
    (sparse_ops.topk_per_token_forward, None),
])
def test_no_input_centring_and_another_output_width_match_the_dense_definition(kernel,
                                                                               reference):
    """b_in=None: pre = x @ W_enc + b_enc (b_dec only the output bias, of width d_out); the
    fast path's outputs and gradients equal the dense definition, and b_dec's gradient is the
    output's alone (no centring term)."""
    inputs = _transcoder_inputs(64, 12, 7, 48)
    fast_in, ref_in = leaves(inputs), leaves(inputs)
    x, W_enc, b_enc, W_dec, b_dec = fast_in
    out = kernel(x, W_enc, b_enc, W_dec, b_dec, 5, b_in=None)
    rx, rWe, rbe, rWd, rbd = ref_in
    pre = rx @ rWe + rbe
    if reference is not None:
        ref = reference(rx, rWe, rbe, rWd, rbd, 5, b_in=None)
        ref_hat, ref_values = ref.x_hat, ref.values
        assert torch.equal(out.latent_idx, ref.latent_idx)
    else:  # per token: the top k of each row, ReLU'd
        top = pre.topk(5, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
        ref_hat = codes @ rWd + rbd
        ref_values = codes[codes > 0]
    torch.testing.assert_close(out.pre_acts, pre.detach(), rtol=1e-5, atol=1e-6)
    assert out.x_hat.shape == (64, 7)
    torch.testing.assert_close(out.x_hat, ref_hat, rtol=1e-5, atol=1e-5)
    target = torch.randn(64, 7)
    ((out.x_hat - target).pow(2).sum() + 0.3 * out.values.pow(2).sum()).backward()
    ((ref_hat - target).pow(2).sum() + 0.3 * ref_values.pow(2).sum()).backward()
    for name, a, b in zip(PARAMS, fast_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    # the output bias gets exactly the output's gradient: sum over tokens of d loss / d x_hat
    torch.testing.assert_close(b_dec.grad, 2 * (out.x_hat - target).sum(0).detach(),
                               rtol=1e-5, atol=1e-5)


def test_a_decoder_of_another_width_cannot_centre_the_input():
    inputs = _transcoder_inputs(8, 12, 7, 48)
    with pytest.raises(ValueError, match="cannot centre the input: pass b_in=None"):
        topk_sae_forward(*inputs, 2)  # the default centres by b_dec, of the wrong width


@pytest.mark.parametrize("k_aux", [3, 40])
def test_auxk_without_input_centring_matches_the_dense_reference(k_aux, auxk_path):
    inputs = _transcoder_inputs(32, 12, 7, 48, seed=3)
    fast_in, ref_in = leaves(inputs), leaves(inputs)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::2] = True
    with torch.no_grad():
        pre = inputs[0] @ inputs[1] + inputs[2]
    fast = auxk_reconstruct(*fast_in, pre, dead, k_aux, b_in=None).e_hat
    ref = auxk_reconstruct_reference(*ref_in, dead, k_aux, b_in=None)
    assert fast.shape == (32, 7)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(32, 7)
    (fast * g).sum().backward()
    (ref * g).sum().backward()
    for name, a, b in zip(PARAMS, fast_in, ref_in):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
            continue
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert fast_in[4].grad is None  # no bias in the AuxK decode, and no centring
