"""Matryoshka BatchTopK (Bussmann et al. 2025): nested prefixes of the dictionary each
reconstruct the input (``matryoshka_batchtopk``).

The dictionary is split into groups (``group_fractions`` of ``d_sae``, in order); prefix ``m``
is the first ``m`` groups. The training encoding is BatchTopK over the whole dictionary; each
prefix decodes only its own latents, and the reconstruction loss is the **mean** of the
prefixes' MSEs (the last prefix is the full SAE), so early latents must reconstruct on their own
and learn general features instead of absorbing them into later, more specific ones. (SAELens
sums the levels instead of averaging them: the same optimum, a loss ``len(groups)`` times
larger, which matters only against ``aux_penalty`` and the lr.) AuxK, the threshold EMA, the
calibration and the SAELens ``jumprelu`` export are BatchTopK's (saes/batchtopk.py); the extra
cost is one sparse decode per step (``trainer.sparse_ops.prefix_decodes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .registration import register
from ..architecture_options import ArchitectureOptions
from ..sparse_ops import prefix_decodes
from .base import TrainStepOutput
from .batchtopk import BatchTopKOptions, BatchTopKSAE


@dataclass
class MatryoshkaOptions(BatchTopKOptions):
    """Fields of ``matryoshka_batchtopk``: BatchTopK's plus the groups."""

    group_fractions: tuple[float, ...] = (0.0625, 0.1875, 0.75)
    """Each group's share of ``d_sae``, in dictionary order (they sum to 1; the prefix widths
    are the rounded cumulative sums, e.g. d_sae 4608 -> prefixes 288, 1152, 4608)."""

    def validate(self) -> None:
        super().validate()
        fr = self.group_fractions
        self._require(isinstance(fr, (list, tuple)) and len(fr) >= 1
                      and all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0
                              for f in fr), "group_fractions",
                      f"must be a non-empty list of positive fractions, got {fr!r}")
        self.group_fractions = tuple(float(f) for f in fr)
        self._require(math.isclose(sum(self.group_fractions), 1.0, abs_tol=1e-6),
                      "group_fractions",
                      f"must sum to 1 (they split d_sae), got sum {sum(self.group_fractions):.6g}")

    def prefix_widths(self, d_sae: int) -> tuple[int, ...]:
        """The cumulative prefix widths (the last is ``d_sae``)."""
        acc, out = 0.0, []
        for f in self.group_fractions:
            acc += f
            out.append(int(round(acc * d_sae)))
        out[-1] = d_sae
        return tuple(out)

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        widths = self.prefix_widths(cfg.d_sae)
        sizes = [b - a for a, b in zip((0,) + widths[:-1], widths)]
        if min(sizes) < 1:
            self._fail("group_fractions",
                       f"gives an empty group at d_sae={cfg.d_sae} (prefix widths {widths})")


@register
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK whose dictionary prefixes each reconstruct the input (module docstring)."""

    architecture: ClassVar[str] = "matryoshka_batchtopk"
    Options: ClassVar[type[ArchitectureOptions]] = MatryoshkaOptions
    inference_rule: ClassVar[str] = (
        BatchTopKSAE.inference_rule + " (the whole dictionary; its nested prefixes also "
        "reconstruct on their own)")

    @property
    def prefix_widths(self) -> tuple[int, ...]:
        return self.cfg.options.prefix_widths(self.cfg.d_sae)

    def training_forward(self, x: Tensor, target: Optional[Tensor] = None) -> TrainStepOutput:
        xs, ys = self.scaled_pair(x, target)
        out = self.selection(xs)
        widths = self.prefix_widths
        recons = [self._with_skip(xs, r) for r in prefix_decodes(out, self.W_dec, self.b_dec,
                                                                  widths)]
        mses = [(r - ys).pow(2).mean() for r in recons]
        terms = {f"mse_prefix_{w}": m.detach() for w, m in zip(widths[:-1], mses[:-1])}
        return self._output(xs, ys, out, recons[-1], torch.stack(mses).mean(), terms)

    def saelens_format(self, folded):
        fmt = super().saelens_format(folded)
        fmt.metadata["matryoshka_widths"] = list(self.prefix_widths)
        return fmt
