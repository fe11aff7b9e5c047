"""The vanilla SAE: ReLU encoder, L1 penalty weighted by the decoder norms (``standard``).

* Inference and training encoding: ``f = relu(pre)``.
* Loss: ``mse + l1_coefficient * mean_t sum_j |f_tj| * ||W_dec[j]||`` on inputs scaled so that
  E||x|| = sqrt(d_in) (the decoder rows stay unit-norm, so the weighting matters only when they
  drift within a step).
* SAELens export: ``standard`` (ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from .registration import register
from ..architecture_options import ArchitectureOptions
from .base import SAE, SAELensFormat, TrainStepOutput


@dataclass
class StandardOptions(ArchitectureOptions):
    """Fields of the ``standard`` (ReLU + L1) SAE."""

    l1_coefficient: float = 0.01
    """L1 sparsity weight: the penalty is sum_j |f_j| * ||W_dec[j]||, averaged over tokens, on
    inputs scaled so that E||x|| = sqrt(d_in)."""

    def validate(self) -> None:
        self._require(isinstance(self.l1_coefficient, (int, float))
                      and not isinstance(self.l1_coefficient, bool)
                      and self.l1_coefficient >= 0, "l1_coefficient",
                      f"must be >= 0, got {self.l1_coefficient!r}")


@register
class StandardSAE(SAE):
    """ReLU + L1 (``architecture: standard``); see the module docstring."""

    architecture: ClassVar[str] = "standard"
    Options: ClassVar[type[ArchitectureOptions]] = StandardOptions
    saelens_reads: ClassVar[Optional[str]] = "standard"
    inference_rule: ClassVar[str] = "a ReLU of the encoder pre-activations (as in training)"

    def encode_scaled(self, x_scaled: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x_scaled))

    def training_forward(self, x: Tensor, target: Optional[Tensor] = None) -> TrainStepOutput:
        xs, ys = self.scaled_pair(x, target)
        f = torch.relu(self.pre_activations(xs))
        x_hat = f @ self.W_dec + self.b_dec
        active = f > 0
        mse = (x_hat - ys).pow(2).mean()
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        return TrainStepOutput(
            target_scaled=ys, output=x_hat, reconstruction_loss=mse,
            sparsity_loss=self.cfg.l1_coefficient * l1,
            terms={"mse": mse.detach(), "l1": l1.detach()},
            fired=active.any(0), l0=active.sum(-1).float().mean().detach())

    def saelens_format(self, folded: SAE) -> SAELensFormat:
        return SAELensFormat("standard")

    def sparsity_coefficients(self) -> dict[str, float]:
        return {"l1_coefficient": float(self.cfg.l1_coefficient)}
