"""TokenBatch: what every token source yields -- the input rows and the target rows.

An SAE reconstructs its input, so its batches carry the **same tensor object** twice
(``TokenBatch.of(x)``: no copy, and ``batch.target is batch.input``). A transcoder reads one hook
and reconstructs another: the two tensors hold the same tokens, row for row, of two hooks
(``CacheReader.token_source(hook, target_hook=...)``, ``trainer.TensorSource(acts, target)``).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class TokenBatch(NamedTuple):
    """One batch of token rows: ``input`` [n, d_in] and ``target`` [n, d_out] (row-aligned)."""

    input: Tensor
    """What the SAE encodes: [n, d_in]."""
    target: Tensor
    """What it reconstructs: [n, d_out]; the very ``input`` tensor for an SAE."""

    @classmethod
    def of(cls, x: Tensor) -> "TokenBatch":
        """The batch of an SAE: ``x`` is both input and target (one tensor, no copy)."""
        return cls(x, x)

    @property
    def autoencodes(self) -> bool:
        """True when the target is the input (an SAE's batch)."""
        return self.target is self.input

    @property
    def num_tokens(self) -> int:
        return int(self.input.shape[0])

    def rows(self, index) -> "TokenBatch":
        """The same rows of input and target (``index``: a slice, a mask or indices); an SAE's
        batch stays one tensor."""
        x = self.input[index]
        return TokenBatch(x, x if self.autoencodes else self.target[index])

    def to(self, device, dtype=None, non_blocking: bool = False) -> "TokenBatch":
        """Both tensors on ``device`` (and ``dtype``); an SAE's batch stays one tensor."""
        x = self.input.to(device=device, dtype=dtype, non_blocking=non_blocking)
        if self.autoencodes:
            return TokenBatch(x, x)
        return TokenBatch(x, self.target.to(device=device, dtype=dtype, non_blocking=non_blocking))
