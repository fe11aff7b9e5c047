"""Aiming at an L0: an architecture that adapts its own sparsity coefficient during training
(``target_l0``), shared by ReLU + L1 (``standard``) and JumpReLU.

Without it, the sparsity of a penalised architecture is a side effect of its coefficient, and
the mapping from coefficient to L0 depends on the hook, the data and the run length (ReLU+L1
jumps from L0 165 to 3 between coefficients 0.0025 and 0.0068 on one hook). With ``target_l0``
set, the coefficient becomes a controlled quantity:

* the configured coefficient (``l1_coefficient`` / ``l0_coefficient``) is only its starting
  value; the coefficient in use is the fp32 buffer ``sparsity_coefficient`` (registered only
  when ``target_l0`` is set, so saved SAEs without it are unchanged), saved in every
  checkpoint, so a resumed run continues bit for bit;
* each training step puts its token-summed training L0 in ``running`` (``l0_sum``,
  ``l0_tokens``); chunks of one step are merged by summing both (a token-weighted mean, not
  the base class's minimum);
* after the optimizer step, with ``L0`` the step's mean training L0 and ``T = target_l0``::

      c <- c * exp(rate * clip(ln(L0 / T), -1, 1))

  (``rate = target_l0_rate``): a proportional controller in log space. Above the target the
  coefficient grows, below it shrinks, by at most a factor ``e^rate`` per step, and it settles
  where the step's L0 equals the target. A step with no active latent counts as L0 -> 0 (the
  clip gives the largest decrease). Compare Karvonen's ReLU branch, which multiplies by
  (1 +- 0.001) on the sign of the error: the same fixed point, but far too slow for a trial of
  a hundred steps; the clipped log error moves quickly far from the target and gently near it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from ..architecture_options import ArchitectureOptions, require_number
from .base import TrainingProgress


@dataclass
class TargetL0Options(ArchitectureOptions):
    """``target_l0`` and its rate (module docstring); mixed into an architecture's options,
    which name the coefficient it adapts in ``coefficient_field``."""

    coefficient_field: ClassVar[str] = ""

    target_l0: Optional[float] = None
    """Mean active latents per token to aim at: the sparsity coefficient then adapts every step
    from its configured value towards the one that gives this training L0. None: a fixed
    coefficient."""
    target_l0_rate: float = 0.05
    """Largest log-change of the coefficient per step under ``target_l0``: it is multiplied by
    exp(rate * clip(ln(L0 / target_l0), -1, 1))."""

    def validate(self) -> None:
        super().validate()
        if self.target_l0 is not None:
            require_number(self, "target_l0", low=0.0, strict=True)
            if not getattr(self, self.coefficient_field) > 0:
                self._fail(self.coefficient_field,
                           "must be > 0 with target_l0 (its starting value, adapted by a "
                           f"factor per step), got {getattr(self, self.coefficient_field)!r}")
        require_number(self, "target_l0_rate", low=0.0, strict=True, high=1.0)

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if self.target_l0 is not None and self.target_l0 > cfg.d_sae:
            self._fail("target_l0", f"must be <= d_sae ({cfg.d_sae}), got {self.target_l0!r}")


def adapted_coefficient(coefficient: Tensor, l0: Tensor, target: float, rate: float) -> Tensor:
    """One step of the rule: ``c * exp(rate * clip(ln(l0 / target), -1, 1))`` in fp32."""
    c = coefficient.float()
    ratio = l0.float().clamp_min(1e-30) / float(target)
    return c * torch.exp(rate * torch.log(ratio).clamp(-1.0, 1.0))


class TargetL0:
    """What an architecture with a ``target_l0`` option inherits (before ``SAE`` in its bases).

    Its options (a ``TargetL0Options``) name the coefficient field; it calls :meth:`init_target_l0` from
    ``init_architecture``, weights its penalty by :meth:`coefficient` and returns
    :meth:`l0_running` as its step's ``running``.
    """

    @property
    def coefficient_field(self) -> str:
        return self.Options.coefficient_field  # type: ignore[attr-defined]

    @property
    def targets_l0(self) -> bool:
        return self.cfg.options.target_l0 is not None  # type: ignore[attr-defined]

    def init_target_l0(self) -> None:
        if self.targets_l0:
            start = float(getattr(self.cfg.options, self.coefficient_field))  # type: ignore[attr-defined]
            self.register_buffer(  # type: ignore[attr-defined]
                "sparsity_coefficient",
                torch.tensor(start, dtype=torch.float32, device=self.device))  # type: ignore[attr-defined]

    def coefficient(self) -> Tensor | float:
        """The sparsity coefficient in use: the adapted buffer, else the configured field."""
        if self.targets_l0:
            return self.sparsity_coefficient  # type: ignore[attr-defined]
        return float(getattr(self.cfg.options, self.coefficient_field))  # type: ignore[attr-defined]

    def l0_running(self, active: Tensor) -> dict[str, Tensor]:
        """The step's running statistics from its active mask [n_tokens, d_sae] (none
        without a target)."""
        if not self.targets_l0:
            return {}
        return {"l0_sum": active.sum().float(),
                "l0_tokens": torch.tensor(float(active.shape[0]), device=active.device)}

    def target_terms(self) -> dict[str, Tensor]:
        """The coefficient in use, for the step's logged terms (none without a target)."""
        if not self.targets_l0:
            return {}
        return {"sparsity_coefficient": self.sparsity_coefficient.detach().clone()}  # type: ignore[attr-defined]

    def merge_running(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(a)
        for key, value in b.items():
            out[key] = value if key not in out else out[key] + value
        return out

    def step_l0(self, running: dict[str, Tensor]) -> Optional[Tensor]:
        """The step's mean training L0 from its merged ``running`` (fp32 scalar), or None
        without a target or without tokens."""
        if not self.targets_l0 or "l0_tokens" not in running:
            return None
        tokens = running["l0_tokens"].float()
        if float(tokens) <= 0:
            return None
        return running["l0_sum"].float() / tokens

    @torch.no_grad()
    def update_running_statistics(self, running: dict[str, Tensor],
                                  progress: TrainingProgress) -> None:
        l0 = self.step_l0(running)
        if l0 is None:
            return
        options = self.cfg.options  # type: ignore[attr-defined]
        buf = self.sparsity_coefficient  # type: ignore[attr-defined]
        buf.copy_(adapted_coefficient(buf, l0.to(buf.device), float(options.target_l0),
                                      float(options.target_l0_rate)))

    def sparsity_coefficients(self) -> dict[str, float]:
        return {self.coefficient_field: float(self.coefficient())}
