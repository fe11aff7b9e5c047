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

  The threshold is a parameter in its own units, not its log. Under Adam a parameter moves
  by about ``lr`` per step whatever its gradient's size, so the threshold can travel only about
  ``lr x steps`` from where it starts (0.5 in a 98-step trial at lr 5e-3) whatever the L0
  coefficient: its **initial value** decides which thresholds a short trial can reach.
* **Initial thresholds from the data.** The useful thresholds scale with the encoder's
  pre-activations, which differ from hook to hook even on inputs scaled to E||x|| = sqrt(d_in)
  (they see the input centred by ``b_dec``: small on a residual stream, whose norm is mostly
  its mean, large on ``hook_mlp_out``). A fixed initial value (SAELens's 0.01) therefore
  trains on one hook and not on another (measured on ``blocks.12.hook_mlp_out``: coefficients
  0.001 / 0.1 / 1 gave L0 338 / 275 / 287, the mean threshold ending at 0.37 / 0.45 / 0.44, about
  ``0.01 + lr x steps``, where an L0 of 48 needs ~1-3). So, unless ``jumprelu_init_threshold``
  fixes a value, :meth:`initialize_from_data` sets each latent's threshold to the quantile of
  its pre-activations on the initialisation tokens at which it fires on ``init_l0 / d_sae``
  of them: training starts at L0 ``init_l0`` (``jumprelu_init_l0``; unset: ``target_l0``, else
  ``d_sae / 8``) with no latent dead, and the coefficient moves it from there on any hook.
* ``target_l0`` (saes/target_l0.py): the L0 coefficient starts at ``l0_coefficient`` and adapts
  every step so that the training L0 reaches the target; below the target the thresholds
  themselves are lowered (:meth:`update_running_statistics`), since the penalty can only raise
  them.
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
from .base import SAE, SAELensFormat, TrainingProgress, TrainStepOutput
from .target_l0 import TargetL0, TargetL0Options


MIN_THRESHOLD = 1e-6
"""The thresholds are used clamped to at least this (the STE for theta needs theta > 0)."""
INIT_THRESHOLD = 0.01
"""The thresholds of an SAE not (yet) initialised from data, unless a fixed one is set."""
INIT_THRESHOLD_TOKENS = 8192
"""At most this many initialisation tokens set the data-derived initial thresholds."""


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
class JumpReLUOptions(TargetL0Options):
    """Fields of ``jumprelu`` (and ``target_l0`` / ``target_l0_rate``, saes/target_l0.py)."""

    coefficient_field: ClassVar[str] = "l0_coefficient"

    l0_coefficient: float = 1e-3
    """Weight of the L0 penalty (mean active latents per token) against the MSE (mean over
    tokens and dimensions, inputs scaled to E||x|| = sqrt(d_in)): the sparsity knob. With
    ``target_l0``: its starting value."""
    jumprelu_bandwidth: float = 0.05
    """Width ``eps`` of the rectangle kernel of the straight-through estimators."""
    jumprelu_init_threshold: Optional[float] = None
    """A fixed initial threshold for every latent; None: set from the data so that training
    starts at L0 ``jumprelu_init_l0``."""
    jumprelu_init_l0: Optional[float] = None
    """The L0 the data-set initial thresholds give on the initialisation tokens (each latent
    fires on init_l0 / d_sae of them); None: ``target_l0`` when set, else d_sae / 8."""

    def validate(self) -> None:
        for name in ("l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold",
                     "jumprelu_init_l0"):
            value = getattr(self, name)
            if value is None and name in ("jumprelu_init_threshold", "jumprelu_init_l0"):
                continue
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value))
            self._require(ok and (value >= 0 if name == "l0_coefficient" else value > 0), name,
                          f"must be {'>= 0' if name == 'l0_coefficient' else '> 0'}, "
                          f"got {value!r}")
        super().validate()

    def check(self, cfg) -> None:
        super().check(cfg)
        if self.jumprelu_init_l0 is not None and self.jumprelu_init_l0 > cfg.d_sae:
            self._fail("jumprelu_init_l0",
                       f"must be <= d_sae ({cfg.d_sae}), got {self.jumprelu_init_l0!r}")

    def init_l0(self, d_sae: int) -> float:
        """The L0 the data-set initial thresholds aim at (field docstring)."""
        if self.jumprelu_init_l0 is not None:
            return float(self.jumprelu_init_l0)
        if self.target_l0 is not None:
            return float(self.target_l0)
        return d_sae / 8


@register
class JumpReLUSAE(TargetL0, SAE):
    """JumpReLU with a learned per-latent threshold (module docstring)."""

    architecture: ClassVar[str] = "jumprelu"
    Options: ClassVar[type[ArchitectureOptions]] = JumpReLUOptions
    saelens_reads: ClassVar[Optional[str]] = "jumprelu"
    inference_rule: ClassVar[str] = ("a JumpReLU with its learned per-latent thresholds (as in "
                                     "training)")

    def init_architecture(self) -> None:
        # filled by initialize_weights, then (unless fixed) from the data
        self.threshold = nn.Parameter(torch.empty(self.cfg.d_sae, dtype=torch.float32,
                                                  device=self.device))
        self.init_target_l0()

    @torch.no_grad()
    def initialize_weights(self, seed: Optional[int] = None) -> None:
        super().initialize_weights(seed)
        fixed = self.cfg.jumprelu_init_threshold
        self.threshold.fill_(float(INIT_THRESHOLD if fixed is None else fixed))

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor, target: Optional[Tensor] = None, **kwargs) -> None:
        """The shared data initialisation (scales, ``b_dec``), then -- unless
        ``jumprelu_init_threshold`` fixes them -- each latent's threshold at the quantile of
        its pre-activations on (at most ``INIT_THRESHOLD_TOKENS`` of) these tokens where it
        fires on ``init_l0 / d_sae`` of them (module docstring)."""
        super().initialize_from_data(x, target, **kwargs)
        if self.cfg.jumprelu_init_threshold is not None:
            return
        self.threshold.copy_(self.data_thresholds(x[:INIT_THRESHOLD_TOKENS]))

    @torch.no_grad()
    def data_thresholds(self, x: Tensor) -> Tensor:
        """Per latent, the fp32 threshold above which it fires on ``init_l0 / d_sae`` of the raw
        tokens ``x`` [n, d_in] (at least one token each; >= the 1e-6 floor)."""
        rows = x.reshape(-1, self.cfg.d_in)
        pre = self.pre_activations(self.scale_input(rows)).float()
        n = pre.shape[0]
        fraction = self.cfg.options.init_l0(self.cfg.d_sae) / self.cfg.d_sae
        above = min(max(int(round(fraction * n)), 1), n)
        # the (above+1)-th largest value: `above` tokens are strictly greater (ties aside)
        kth = pre.topk(min(above + 1, n), dim=0).values[-1] if above < n else pre.min(0).values - 1
        return kth.clamp_min(MIN_THRESHOLD)

    @torch.no_grad()
    def update_running_statistics(self, running: dict[str, Tensor],
                                  progress: TrainingProgress) -> None:
        """``target_l0``: the coefficient's rule (saes/target_l0.py), then -- only while the
        step's L0 is **below** the target -- every threshold scaled by
        ``exp(rate * clip(ln(L0 / target), -1, 0))``. The L0 penalty can only raise thresholds,
        and early in training the reconstruction loss shrinks the pre-activations (measured on
        ``blocks.6.hook_mlp_out``: L0 72 -> 13 in 14 steps with the coefficient at 0 and the
        thresholds barely moved), so below the target only moving the thresholds themselves
        brings the L0 back; above it the penalty does the work."""
        super().update_running_statistics(running, progress)
        l0 = self.step_l0(running)
        if l0 is None:
            return
        options = self.cfg.options
        step = max(min(math.log(max(float(l0), 1e-30) / float(options.target_l0)), 0.0), -1.0)
        if step < 0:
            self.threshold.mul_(math.exp(float(options.target_l0_rate) * step))

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
            sparsity_loss=self.coefficient() * l0,
            terms={"mse": mse.detach(), "l0_penalty": l0.detach(), **self.target_terms()},
            fired=active.any(0), l0=active.sum(-1).float().mean(),
            running=self.l0_running(active))

    def saelens_format(self, folded: SAE) -> SAELensFormat:
        return SAELensFormat("jumprelu",
                             tensors={"threshold": folded.theta().detach().to(folded.dtype)})
