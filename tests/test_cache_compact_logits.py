import math

import pytest
import torch

from activation_cache.compact_logits import compact_kl, compact_logprobs, full_kl


def test_compact_logprobs_hand_case():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(5.0), math.log(2.0)]])  # p = 1,2,5,2 /10
    lp, idx, lse = compact_logprobs(logits, 2)
    assert idx.tolist() == [[2, 1]] or idx.tolist() == [[2, 3]]
    assert lse.item() == pytest.approx(math.log(10.0), abs=1e-6)
    assert lp[0, 0].item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert lp[0, 1].item() == pytest.approx(math.log(0.2), abs=1e-6)


def test_compact_kl_hand_computed_tail_bucket():
    # clean p = (0.5, 0.2, 0.2, 0.1); other q = (0.25, 0.25, 0.25, 0.25); k = 2 keeps ids 0, 1
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q_logits = torch.zeros(4)
    lp, idx, _ = compact_logprobs(p.log(), 2)
    # order ties: ids 1 and 2 both have 0.2; whichever is kept, the bucket math is the same
    kept = set(idx.tolist())
    assert 0 in kept
    expected = 0.5 * math.log(0.5 / 0.25) + 0.2 * math.log(0.2 / 0.25) + 0.3 * math.log(0.3 / 0.5)
    assert compact_kl(lp, idx, q_logits).item() == pytest.approx(expected, abs=1e-6)
    true = sum(pi * math.log(pi / 0.25) for pi in p.tolist())
    assert expected <= true  # data-processing inequality


def test_compact_kl_exact_with_full_logprobs_and_bounded_otherwise():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 5, 40, generator=g) * 3
    other = clean + torch.randn(3, 5, 40, generator=g)
    exact = full_kl(clean, other)
    lp, idx, _ = compact_logprobs(clean, 40)
    assert torch.allclose(compact_kl(lp, idx, other), exact, atol=1e-5)
    previous = torch.zeros_like(exact)
    for k in (1, 4, 16, 39):
        lp, idx, _ = compact_logprobs(clean, k)
        approx = compact_kl(lp, idx, other)
        assert (approx <= exact + 1e-5).all()
        assert (approx >= previous - 1e-5).all()  # a finer partition never lowers the bound
        previous = approx


def test_compact_kl_zero_for_equal_distributions_and_has_gradients():
    logits = torch.randn(2, 7, 30)
    lp, idx, _ = compact_logprobs(logits, 5)
    other = logits.clone().requires_grad_(True)
    kl = compact_kl(lp, idx, other)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-5)
    (compact_kl(lp, idx, other + torch.randn_like(other))).sum().backward()
    assert other.grad is not None and torch.isfinite(other.grad).all()
    assert other.grad.abs().sum() > 0


def test_compact_logprobs_rejects_bad_k():
    with pytest.raises(ValueError):
        compact_logprobs(torch.zeros(2, 5), 6)


def test_compact_kl_error_is_small_when_the_tail_is_light():
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(64, 500, generator=g)
    clean[:, :8] += 12.0  # a peaked next-token distribution: ~99.9% of the mass in 8 ids
    other = clean + 0.5 * torch.randn(64, 500, generator=g)
    exact = full_kl(clean, other)
    lp, idx, _ = compact_logprobs(clean, 16)
    err = exact - compact_kl(lp, idx, other)
    assert (err >= -1e-6).all()
    assert err.mean() < 0.01 * exact.mean()
