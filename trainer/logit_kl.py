"""Next-token distribution math for the end-to-end losses: KL(clean ‖ spliced), CE, top-1.

Direction, everywhere in the project: ``KL(clean ‖ spliced) = Σ_v p_clean(v) (log p_clean(v) −
log p_spliced(v))`` — the expected extra code length of the spliced model's predictions under the
clean model's, zero iff they agree. (e2e_sae's ``F.kl_div(log_softmax(new), log_softmax(orig))``
computes the same direction; the user's design notes had the reverse.) Log-probabilities come from
``log_softmax``, never ``log(softmax)``, so tokens with tiny probability do not become ``-inf``.

The clean distribution comes in one of two forms:

* **full logits** (a clean forward pass): ``log_softmax(logits / T)`` over the whole vocabulary;
* **compact** (what the activation cache stores): the clean top-k log-probs (at temperature 1)
  with their token ids. The remaining ``1 − Σ top-k`` probability is one **tail bucket**, and the
  spliced distribution is coarse-grained the same way (its probabilities at the same k ids, plus
  the sum over every other token). The KL is then computed between these two (k+1)-outcome
  distributions. At temperature 1 this is a lower bound of the full KL (coarse-graining never
  increases a KL); the gap is ``p_clean(tail) · KL(clean tail ‖ spliced tail)``, which the cache
  reports as the compact-logits error. A temperature T ≠ 1 is applied to the bucketed
  distributions (each bucket's log-mass divided by T, then renormalised) because the tail's
  individual logits are not stored. With k = vocabulary size the two forms coincide.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_clean_spliced(clean_logprobs: Tensor, spliced_logprobs: Tensor) -> Tensor:
    """Per-position ``KL(clean ‖ spliced) = Σ p_clean (log p_clean − log p_spliced)``.

    Both arguments are normalised log-probabilities over the same outcomes, shape ``[..., V]``;
    returns ``[...]``. Outcomes with ``p_clean = 0`` contribute exactly 0 (also when the spliced
    log-prob there is ``-inf``). Differentiable in both arguments; the end-to-end loss passes a
    detached clean side, so the gradient flows into the spliced side only.
    """
    p = clean_logprobs.exp()
    diff = torch.where(p > 0, clean_logprobs - spliced_logprobs, torch.zeros_like(p))
    return (p * diff).sum(-1)


def temperature_logprobs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` over the last dimension, in float32 or wider."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)


class CompactClean(NamedTuple):
    """The cached compact clean distribution of one batch."""

    topk_logprobs: Tensor  # [..., k] float, log p_clean at temperature 1
    topk_indices: Tensor  # [..., k] int64 token ids


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, accurate on both branches (Mächler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def clean_bucket_logprobs(compact: CompactClean) -> Tensor:
    """Log-probs of the k+1 buckets (top-k tokens, then the tail) of the clean distribution."""
    top = compact.topk_logprobs.float()
    tail = _log1mexp(torch.logsumexp(top, dim=-1, keepdim=True))
    return torch.cat([top, tail], dim=-1)


def spliced_bucket_logprobs(spliced_logprobs: Tensor, topk_indices: Tensor) -> Tensor:
    """Coarse-grain a full log-prob tensor ``[..., V]`` to the clean top-k ids plus a tail bucket.

    The tail is a log-sum-exp over the other V − k tokens (not ``log(1 − Σ top-k)``), so it stays
    exact when the top-k carry nearly all the mass.
    """
    top = spliced_logprobs.gather(-1, topk_indices)
    rest = spliced_logprobs.scatter(-1, topk_indices, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


def _retemper(bucket_logprobs: Tensor, temperature: float) -> Tensor:
    if temperature == 1.0:
        return bucket_logprobs
    return F.log_softmax(bucket_logprobs / temperature, dim=-1)


def kl_from_logits(
    spliced_logits: Tensor,
    *,
    clean_logits: Optional[Tensor] = None,
    compact: Optional[CompactClean] = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-position KL(clean ‖ spliced) from spliced logits ``[..., V]`` and either the clean
    logits (full vocabulary) or the cached compact clean distribution (see the module docstring).
    The clean side is detached."""
    spliced = temperature_logprobs(spliced_logits, 1.0 if clean_logits is None else temperature)
    if clean_logits is not None:
        clean = temperature_logprobs(clean_logits.detach(), temperature)
        return kl_clean_spliced(clean, spliced)
    if compact is None:
        raise ValueError("kl_from_logits: give clean_logits or compact")
    if compact.topk_indices.shape[-1] >= spliced.shape[-1]:  # full log-probs were stored
        clean_b = compact.topk_logprobs.float().detach()
        spliced_b = spliced.gather(-1, compact.topk_indices)
    else:
        clean_b = clean_bucket_logprobs(compact).detach()
        spliced_b = spliced_bucket_logprobs(spliced, compact.topk_indices)
    return kl_clean_spliced(_retemper(clean_b, temperature), _retemper(spliced_b, temperature))


def next_token_nll(logits: Tensor, tokens: Tensor) -> Tensor:
    """``−log p(tokens[:, t+1] | ≤ t)`` per position ``[b, T]``; the last position is NaN (no
    next token)."""
    logprobs = temperature_logprobs(logits[:, :-1])
    nll = -logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    pad = torch.full_like(nll[:, :1], float("nan"))
    return torch.cat([nll, pad], dim=1)


def next_token_mask(train_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """Positions whose next-token loss counts: on the train mask and followed by a real token."""
    nxt = torch.zeros_like(attention_mask, dtype=torch.bool)
    nxt[:, :-1] = attention_mask[:, 1:].bool()
    return train_mask.bool() & nxt
