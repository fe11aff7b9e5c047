"""Where training activations come from: the ``ActivationSource`` protocol and ``TensorSource``.

An ActivationSource yields shuffled batches of token rows as ``TokenBatch(input, target)``
(``activation_cache.TokenBatch``, re-exported as ``trainer.TokenBatch``): what the SAE encodes
and what it reconstructs, row-aligned. For an SAE the target **is** the input tensor (one
object, no copy); a transcoder's target is another hook's rows of the same tokens. The activation
cache's reader implements it for data on disk (``token_source(hook, target_hook=...)``);
``TensorSource`` serves tensors held in memory (tests, demos).
"""

from __future__ import annotations

from typing import Iterator, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from activation_cache import TokenBatch

from .errors import DimensionMismatchError

__all__ = ["ActivationSource", "TensorSource", "TokenBatch"]


@runtime_checkable
class ActivationSource(Protocol):
    """Token rows of one input hook and their targets.

    ``iter_batches`` is deterministic for ``(seed, epoch)``; ``start_batch=n`` yields exactly
    what the full iteration would yield from its n-th batch on (how training resumes
    bit-for-bit). Batches are ``TokenBatch(input [batch_size, d_in], target [batch_size,
    d_out])`` (float32 unless the source says otherwise; the last one may be smaller).
    """

    d_in: int
    d_out: int
    num_tokens: int

    def iter_batches(self, batch_size: int, *, seed: int, epoch: int,
                     start_batch: int = 0) -> Iterator[TokenBatch]: ...


def _rows(t: Tensor, what: str) -> Tensor:
    if not isinstance(t, Tensor) or t.ndim < 2 or not t.is_floating_point():
        raise DimensionMismatchError(
            f"TensorSource needs a floating-point tensor [num_tokens, width] as {what}, got "
            f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    return t.reshape(-1, t.shape[-1]).float()


class TensorSource:
    """An in-memory ActivationSource over ``acts`` ([num_tokens, d_in], or [..., d_in]
    flattened) and, for a transcoder, ``target`` ([num_tokens, d_out]: the same tokens' rows of
    the output hook); without ``target`` each batch's target is its input tensor.

    ``shuffle=True`` permutes the tokens once per (seed, epoch); the last batch may be smaller.
    """

    def __init__(self, acts: Tensor, target: Optional[Tensor] = None, *, shuffle: bool = True):
        self.acts = _rows(acts, "input")
        self.target = None if target is None else _rows(target, "target")
        if self.target is not None and self.target.shape[0] != self.acts.shape[0]:
            raise DimensionMismatchError(
                f"TensorSource: the target has {self.target.shape[0]} rows but the input "
                f"{self.acts.shape[0]}: they must be the same tokens, row for row")
        self.shuffle = shuffle
        self.d_in = int(self.acts.shape[1])
        self.d_out = self.d_in if self.target is None else int(self.target.shape[1])
        self.num_tokens = int(self.acts.shape[0])

    def iter_batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0,
                     start_batch: int = 0) -> Iterator[TokenBatch]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.shuffle:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_tokens, generator=gen)
        else:
            order = None
        for start in range(start_batch * batch_size, self.num_tokens, batch_size):
            stop = min(start + batch_size, self.num_tokens)
            index = order[start:stop] if order is not None else slice(start, stop)
            x = self.acts[index]
            yield TokenBatch(x, x if self.target is None else self.target[index])
