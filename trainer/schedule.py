"""Learning-rate schedules: one phase (warm-up, constant, decay), a plain linear decay, or
several back to back.

A schedule maps the 0-based step index to a learning rate; the training loop asks it before
every step (``Objective.schedule`` chooses it, so a two-phase objective can give each phase its
own warm-up and decay).
"""

from __future__ import annotations

from typing import Any, Sequence


class Schedule:
    """Linear warm-up, constant, linear decay to 0 at the end.

    Warm-up and decay come from the config: ``TrainingConfig.warmup_steps`` (a fraction of the
    run, or an absolute count capped at a tenth of it) and ``lr_decay_fraction`` (the final
    fraction of the steps)."""

    def __init__(self, config: Any, base_lr: float, total_steps: int):
        self.base = base_lr
        self.total = total_steps
        self.warmup = config.warmup_steps(total_steps)
        self.decay_start = total_steps - int(total_steps * config.lr_decay_fraction)

    def lr(self, step: int) -> float:
        """Learning rate of the step with 0-based index ``step``."""
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        if step >= self.decay_start and self.total > self.decay_start:
            return self.base * (self.total - step) / (self.total - self.decay_start)
        return self.base


class LinearDecay:
    """No warm-up, linear decay from ``base_lr`` on the first step to 0 after the last
    (``finetune_schedule: linear``, the published fine-tune recipe): step ``i`` of ``total``
    runs at ``base_lr x (total - i) / total``."""

    def __init__(self, base_lr: float, total_steps: int):
        self.base = base_lr
        self.total = total_steps

    def lr(self, step: int) -> float:
        """Learning rate of the step with 0-based index ``step``."""
        if self.total <= 0:
            return self.base
        return self.base * max(self.total - step, 0) / self.total


class PhasedSchedule:
    """Schedules run one after the other: ``phases[i]`` covers its own ``total`` steps."""

    def __init__(self, phases: Sequence[Any]):
        self.phases = list(phases)
        self.total = sum(p.total for p in self.phases)

    def lr(self, step: int) -> float:
        for phase in self.phases:
            if step < phase.total:
                return phase.lr(step)
            step -= phase.total
        return self.phases[-1].lr(self.phases[-1].total - 1) if self.phases else 0.0
