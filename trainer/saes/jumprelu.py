"""JumpReLU (Rajamanoharan et al. 2024, the Gemma Scope recipe): a learned per-latent threshold
trained with straight-through estimators and an L0 penalty (``jumprelu``).

* Encoding (training and inference alike): ``f = z * H(z - theta)`` with ``z`` the encoder
  pre-activations and ``theta`` per latent (the fp32 parameter ``threshold``, used clamped to
  >= 1e-6), i.e. ``relu(z) * (z > theta)``.
* Loss: ``mse + l0_coefficient * mean_t sum_j H(z_tj - theta_j)``.
* Gradients through the step function ``H`` (which has none) come from straight-through
  estimators with a rectangle kernel ``K(u) = 1[|u| < 1/2]`` of bandwidth ``eps``
  (DeepMind's variant: they reach the threshold only):

  - ``d f / d theta = -(theta / eps) K((z - theta) / eps)``, ``d f / d z = H(z - theta)``;
  - ``d H / d theta = -(1 / eps) K((z - theta) / eps)``, ``d H / d z = 0``.

  The threshold is a parameter in its own units, not its log: under Adam a log-threshold moves
  by at most ``lr`` in log space per step (a factor e^(lr x steps)), so from a small initial
  value it could not reach its useful range in a short trial whatever the L0 coefficient
  (measured: 0.01 -> 0.03 in 200 steps at lr 5e-3, and L0 identical for coefficients 1e-3 and
  1e-2); SAELens made the same choice.
* Defaults follow SAELens's for inputs scaled to E||x|| = sqrt(d_in) (the same convention as
  here): initial threshold 0.01, bandwidth 0.05. Our MSE is a mean over dimensions (SAELens sums
  them), so an ``l0_coefficient`` here is about ``d_in`` times smaller than SAELens's for the
  same trade-off.
* Nothing to calibrate: the threshold is learned. SAELens export: ``jumprelu`` with the
  thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from .registration import register
from ..architecture_options import ArchitectureOptions
from .base import SAE, SAELensFormat, TrainStepOutput


MIN_THRESHOLD = 1e-6
"""The thresholds are used clamped to at least this (the STE for theta needs theta > 0)."""


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """``z * (z > theta)`` with the straight-through gradient for ``theta`` (module docstring)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dz = grad * (z > theta).to(grad.dtype)
        dtheta = -(theta / eps) * _rectangle((z - theta) / eps) * grad
        return dz, dtheta.reshape(-1, theta.shape[-1]).sum(0), None


class StepFunction(torch.autograd.Function):
    """``H(z - theta)`` with the straight-through gradient for ``theta`` only (module docstring)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dtheta = -(1.0 / eps) * _rectangle((z - theta) / eps) * grad
        return None, dtheta.reshape(-1, theta.shape[-1]).sum(0), None


@dataclass
class JumpReLUOptions(ArchitectureOptions):
    """Fields of ``jumprelu``."""

    l0_coefficient: float = 1e-3
    """Weight of the L0 penalty (mean active latents per token) against the MSE (mean over
    tokens and dimensions, inputs scaled to E||x|| = sqrt(d_in)): the sparsity knob."""
    jumprelu_bandwidth: float = 0.05
    """Width ``eps`` of the rectangle kernel of the straight-through estimators."""
    jumprelu_init_threshold: float = 0.01
    """Initial threshold of every latent."""

    def validate(self) -> None:
        for name in ("l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            value = getattr(self, name)
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value))
            self._require(ok and (value >= 0 if name == "l0_coefficient" else value > 0), name,
                          f"must be {'>= 0' if name == 'l0_coefficient' else '> 0'}, "
                          f"got {value!r}")


@register
class JumpReLUSAE(SAE):
    """JumpReLU with a learned per-latent threshold (module docstring)."""

    architecture: ClassVar[str] = "jumprelu"
    Options: ClassVar[type[ArchitectureOptions]] = JumpReLUOptions
    saelens_reads: ClassVar[Optional[str]] = "jumprelu"
    inference_rule: ClassVar[str] = ("a JumpReLU with its learned per-latent thresholds (as in "
                                     "training)")

    def init_architecture(self) -> None:
        # filled with jumprelu_init_threshold by initialize_weights
        self.threshold = nn.Parameter(torch.empty(self.cfg.d_sae, dtype=torch.float32,
                                                  device=self.device))

    @torch.no_grad()
    def initialize_weights(self, seed: Optional[int] = None) -> None:
        super().initialize_weights(seed)
        self.threshold.fill_(float(self.cfg.jumprelu_init_threshold))

    def theta(self) -> Tensor:
        """The thresholds in use [d_sae] (fp32): the parameter, clamped to >= 1e-6."""
        return self.threshold.clamp_min(MIN_THRESHOLD)

    def encode_scaled(self, x_scaled: Tensor) -> Tensor:
        pre = self.pre_activations(x_scaled)
        theta = self.theta().to(pre.dtype)
        return torch.relu(pre) * (pre > theta)

    def inference_threshold(self) -> Optional[float]:
        return float(self.theta().detach().mean())

    def training_forward(self, x: Tensor, target: Optional[Tensor] = None) -> TrainStepOutput:
        xs, ys = self.scaled_pair(x, target)
        pre = self.pre_activations(xs)
        theta = self.theta().to(pre.dtype)
        eps = float(self.cfg.jumprelu_bandwidth)
        f = JumpReLUFunction.apply(pre, theta, eps)
        l0_per_token = StepFunction.apply(pre, theta, eps).sum(-1)
        x_hat = f @ self.W_dec + self.b_dec
        mse = (x_hat - ys).pow(2).mean()
        l0 = l0_per_token.mean()
        active = f.detach() > 0
        return TrainStepOutput(
            target_scaled=ys, output=x_hat, reconstruction_loss=mse,
            sparsity_loss=self.cfg.l0_coefficient * l0,
            terms={"mse": mse.detach(), "l0_penalty": l0.detach()},
            fired=active.any(0), l0=active.sum(-1).float().mean())

    def saelens_format(self, folded: SAE) -> SAELensFormat:
        return SAELensFormat("jumprelu",
                             tensors={"threshold": folded.theta().detach().to(folded.dtype)})

    def sparsity_coefficients(self) -> dict[str, float]:
        return {"l0_coefficient": float(self.cfg.l0_coefficient)}
