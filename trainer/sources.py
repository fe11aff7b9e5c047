"""Where training activations come from: the ``ActivationSource`` protocol and ``TensorSource``.

An ActivationSource yields shuffled batches of token activations. The activation cache's reader
implements it for data on disk; ``TensorSource`` serves a tensor held in memory (tests, demos).
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import DimensionMismatchError


@runtime_checkable
class ActivationSource(Protocol):
    """Token activations for one hook.

    ``iter_batches`` is deterministic for ``(seed, epoch)``; ``start_batch=n`` yields exactly
    what the full iteration would yield from its n-th batch on (how training resumes
    bit-for-bit). Batches are float32 ``[batch_size, d_in]`` (the last one may be smaller).
    """

    d_in: int
    num_tokens: int

    def iter_batches(self, batch_size: int, *, seed: int, epoch: int,
                     start_batch: int = 0) -> Iterator[Tensor]: ...


class TensorSource:
    """An in-memory ActivationSource over ``acts`` ([num_tokens, d_in], or [..., d_in] flattened).

    ``shuffle=True`` permutes the tokens once per (seed, epoch); the last batch may be smaller.
    """

    def __init__(self, acts: Tensor, *, shuffle: bool = True):
        if not isinstance(acts, Tensor) or acts.ndim < 2 or not acts.is_floating_point():
            raise DimensionMismatchError(
                "TensorSource needs a floating-point tensor [num_tokens, d_in], got "
                f"{type(acts).__name__} {tuple(getattr(acts, 'shape', ()))}"
            )
        self.acts = acts.reshape(-1, acts.shape[-1]).float()
        self.shuffle = shuffle
        self.d_in = int(self.acts.shape[1])
        self.num_tokens = int(self.acts.shape[0])

    def iter_batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0,
                     start_batch: int = 0) -> Iterator[Tensor]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.shuffle:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_tokens, generator=gen)
        else:
            order = None
        for start in range(start_batch * batch_size, self.num_tokens, batch_size):
            stop = min(start + batch_size, self.num_tokens)
            yield self.acts[order[start:stop]] if order is not None else self.acts[start:stop]
