"""The vanilla SAE: ReLU encoder, L1 penalty weighted by the decoder norms (``standard``).

* Inference and training encoding: ``f = relu(pre)``.
* Loss: ``mse + l1_coefficient * mean_t sum_j |f_tj| * ||W_dec[j]||`` on inputs scaled so that
  E||x|| = sqrt(d_in) (the decoder rows stay unit-norm, so the weighting matters only when they
  drift within a step).
* ``target_l0`` (saes/target_l0.py): the L1 coefficient starts at ``l1_coefficient`` and
  adapts every step so that the training L0 reaches the target.
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
from .target_l0 import TargetL0, TargetL0Options


@dataclass
class StandardOptions(TargetL0Options):
    """Fields of the ``standard`` (ReLU + L1) SAE: the L1 weight, and ``target_l0`` /
    ``target_l0_rate`` (saes/target_l0.py), which adapt it."""

    coefficient_field: ClassVar[str] = "l1_coefficient"

    l1_coefficient: float = 0.01
    """L1 sparsity weight: the penalty is sum_j |f_j| * ||W_dec[j]||, averaged over tokens, on
    inputs scaled so that E||x|| = sqrt(d_in). With ``target_l0``: its starting value."""

    def validate(self) -> None:
        self._require(isinstance(self.l1_coefficient, (int, float))
                      and not isinstance(self.l1_coefficient, bool)
                      and self.l1_coefficient >= 0, "l1_coefficient",
                      f"must be >= 0, got {self.l1_coefficient!r}")
        super().validate()


@register
class StandardSAE(TargetL0, SAE):
    """ReLU + L1 (``architecture: standard``); see the module docstring."""

    architecture: ClassVar[str] = "standard"
    Options: ClassVar[type[ArchitectureOptions]] = StandardOptions
    saelens_reads: ClassVar[Optional[str]] = "standard"
    inference_rule: ClassVar[str] = "a ReLU of the encoder pre-activations (as in training)"

    def init_architecture(self) -> None:
        self.init_target_l0()

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
            sparsity_loss=self.coefficient() * l1,
            terms={"mse": mse.detach(), "l1": l1.detach(), **self.target_terms()},
            fired=active.any(0), l0=active.sum(-1).float().mean().detach(),
            running=self.l0_running(active))

    def saelens_format(self, folded: SAE) -> SAELensFormat:
        return SAELensFormat("standard")
