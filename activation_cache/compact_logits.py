"""Compact clean next-token distributions, and the KL of another distribution against one.

Storing the clean model's full log-probs costs ``d_vocab`` numbers per token (49,152 for
SmolLM2: ~192 KB/token in fp32). The cache stores instead, per token,

* ``topk_logprobs`` [..., k]  -- the k largest clean log-probs ``log p_i`` (descending),
* ``topk_indices``  [..., k]  -- their vocabulary ids (the set S),
* ``logsumexp``     [...]     -- logsumexp of the raw clean logits (``logit_i = log p_i + lse``).

**Compact KL.** Let S be the clean top-k set and T = V \\ S its complement (the *tail*), merged
into one bucket. With ``p_T = 1 - sum_{i in S} p_i`` and ``q_T = 1 - sum_{i in S} q_i``::

    KL_k(p || q) = sum_{i in S} p_i (log p_i - log q_i)  +  p_T (log p_T - log q_T)

with 0 log 0 = 0. Direction: always KL(clean || other), the project convention.

**It is a lower bound.** Merging T into one bucket is the same deterministic map applied to both
distributions, so by the data-processing inequality ``KL_k(p||q) <= KL(p||q)``. The gap is exactly
``p_T * KL(p(.|T) || q(.|T))``: it vanishes when the tail carries no clean mass or when the other
distribution has the same shape inside the tail, and it is zero when k = d_vocab (full log-probs:
the formula is then the exact KL).

``log q_T`` is computed from the other logits as ``logsumexp(other logits outside S) - lse``,
never as ``log(1 - sum)``, so it is accurate even when q_T is tiny; ``log p_T`` uses
``log(-expm1(logsumexp(topk_logprobs)))``. Everything runs in float32 (or wider).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compact_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k log-probs [..., k] f32 (descending), their indices [..., k] int64 and logsumexp [...]."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, d_vocab={logits.shape[-1]}], got {k}")
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    values, indices = torch.topk(logits, k, dim=-1, sorted=True)
    return values - lse.unsqueeze(-1), indices, lse


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near both ends; -inf at x = 0."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def compact_kl(
    clean_topk_logprobs: Tensor, clean_topk_indices: Tensor, other_logits: Tensor
) -> Tensor:
    """Per-token KL_k(clean || other) [...] from the compact clean distribution (see module doc).

    ``other_logits`` [..., d_vocab] are raw logits (any float dtype; computed in f32);
    gradients flow into them. The result is a lower bound of the true KL, exact when k = d_vocab.
    """
    lp = clean_topk_logprobs.float()
    idx = clean_topk_indices.long()
    other = other_logits.float()
    lse_q = torch.logsumexp(other, dim=-1, keepdim=True)
    log_q_s = other.gather(-1, idx) - lse_q
    p_s = lp.exp()
    kl_s = (p_s * (lp - log_q_s)).sum(-1)
    if idx.shape[-1] == other.shape[-1]:
        return kl_s  # full log-probs: no tail, the exact KL

    log_p_t = _log1mexp(torch.logsumexp(lp, dim=-1))
    masked = other.scatter(-1, idx, float("-inf"))
    log_q_t = torch.logsumexp(masked, dim=-1) - lse_q.squeeze(-1)
    p_t = log_p_t.exp()
    # 0 log 0 = 0: where the clean tail is empty (k = d_vocab, or all mass in S) it adds nothing.
    tail = torch.where(p_t > 0, p_t * (log_p_t - log_q_t), torch.zeros_like(p_t))
    return kl_s + tail


def full_kl(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    """Per-token exact KL(clean || other) [...] from full logits (the reference)."""
    lp = torch.log_softmax(clean_logits.float(), dim=-1)
    lq = torch.log_softmax(other_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)
