"""BatchTopK skip transcoder (``batchtopk_skip_transcoder``): a transcoder plus a linear path.

``y_hat = f(x) @ W_dec + b_dec + x @ W_skip.T`` -- the BatchTopK transcoder
(saes/batchtopk_transcoder.py) with a learned dense linear map ``W_skip`` [d_out, d_in] from the
input to the output, **zero-initialised**, so the sparse latents only have to explain what a
linear map of the input cannot (Paulo et al. 2025, "Transcoders beat sparse autoencoders for
interpretability": skip transcoders reach lower loss at the same sparsity with latents as
interpretable). The skip path is part of the shipped model (``forward``), of the training
output, of AuxK's residual and of the end-to-end splice; ``decode(f)`` is the dictionary's part
alone (as in SAELens). In the scaled spaces the path is ``x_s @ W_skip.T``; folding the scales
gives ``W_skip * s_in / s_out`` on raw activations.

SAELens export: ``jumprelu_skip_transcoder`` (threshold = the calibrated theta, ``W_skip``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from ..architecture_options import ArchitectureOptions
from .base import SAE, SAELensFormat
from .batchtopk_transcoder import BatchTopKTranscoder, BatchTopKTranscoderOptions
from .registration import register


@dataclass
class SkipTranscoderOptions(BatchTopKTranscoderOptions):
    """Fields of ``batchtopk_skip_transcoder``: the BatchTopK transcoder's (the skip path has
    no settings: it is zero-initialised and trained with the rest)."""


@register
class BatchTopKSkipTranscoder(BatchTopKTranscoder):
    """BatchTopK transcoder with a zero-initialised linear skip path (module docstring)."""

    architecture: ClassVar[str] = "batchtopk_skip_transcoder"
    Options: ClassVar[type[ArchitectureOptions]] = SkipTranscoderOptions
    inference_rule: ClassVar[str] = (
        BatchTopKTranscoder.inference_rule + ", plus the linear skip path x @ W_skip.T")

    def init_architecture(self) -> None:
        super().init_architecture()
        self.W_skip = nn.Parameter(torch.zeros(self.cfg.d_out, self.cfg.d_in, dtype=self.dtype,
                                               device=self.device))

    @torch.no_grad()
    def initialize_weights(self, seed: Optional[int] = None) -> None:
        super().initialize_weights(seed)
        self.W_skip.zero_()

    def skip_scaled(self, x_scaled: Tensor) -> Optional[Tensor]:
        return x_scaled @ self.W_skip.t()

    @torch.no_grad()
    def fold_architecture(self, input_scale: float, output_scale: float) -> None:
        self.W_skip.mul_(input_scale / output_scale)

    def saelens_format(self, folded: SAE) -> SAELensFormat:
        fmt = super().saelens_format(folded)
        fmt.architecture = "jumprelu_skip_transcoder"
        fmt.tensors["W_skip"] = folded.W_skip.detach().clone()
        return fmt
