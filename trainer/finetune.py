"""The two-phase schedule: train locally on cached activations, then fine-tune end to end.

Karvonen 2025 ("Revisiting End-To-End Sparse Autoencoder Training: A Short Finetune Is All You
Need") trains on MSE from cached activations and spends only the last few percent of the tokens
on a KL (+ MSE) fine-tune through the model; that short fine-tune closes much of the CE-loss gap
that full end-to-end training closes, at a fraction of its cost. ``TwoPhaseObjective`` joins
the two objectives this package already has into one run that the loop treats like any other:

* **Phase 1** (the first ``1 - finetune_fraction`` of ``max_tokens``): ``LocalObjective`` on
  shuffled token rows (``PhasedSource.tokens``), ``S1 = ceil((1-f) max_tokens /
  train_batch_tokens)`` steps, its own warm-up and linear decay at ``lr``.
* **Phase 2** (the rest): ``EndToEndObjective`` on whole windows (``PhasedSource.sequences``)
  in batches of ``finetune_batch_sequences`` windows (default ``batch_size``),
  ``S2 = ceil(f max_tokens / tokens per batch of windows)`` steps at ``finetune_lr`` (default
  ``lr / 10``), on its own schedule (``finetune_schedule``: ``phase``, the local phase's shape;
  ``linear``, the published recipe's decay from ``finetune_lr`` to 0 with no warm-up). The loss
  is the SAE's own (reconstruction + its penalties) + ``logit_kl_weight`` x s x KL (+ block-MSE);
  with ``logit_kl_scale: mse`` the KL scale s is fixed on the first fine-tune batch so the weight
  is relative to the MSE there; with ``balanced`` it is measured again on every step (the
  published recipe, trainer/end_to_end.py).

A fine-tune of fewer than ``MIN_FINETUNE_STEPS`` optimizer steps gets a one-line warning
through the reporter (``warnings``): in the published measurements about half of the CE gain
needs ~500 steps, and the recipe runs thousands.

What carries over at the boundary: every weight (nothing is re-initialised), Adam's moments,
the dead-latent counters (a latent's idle count keeps running), the BatchTopK threshold EMA (the
fine-tune's minima keep entering it), the outlier cap (one ``LocalObjective`` serves both
phases). At the end the threshold is calibrated as in any run.

The loop sees one planned run of ``S1 + S2`` steps (``planned_steps``) as a single "epoch" of
batches: batch ``b < S1`` is local batch ``b`` (cycling the local epochs), batch ``b >= S1`` is
fine-tune batch ``b - S1`` (cycling the window epochs), so ``start_batch`` resumes anywhere,
in either phase or across the boundary, bit for bit. Validation during phase 1 reports the
reconstruction metrics; from the boundary on (and the final record) it adds the end-to-end ones
(CE, KL) on whole validation windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from torch import Tensor

from .end_to_end import EndToEndObjective, SequenceSource
from .objective import Objective, StepOutput
from .saes.base import SAE
from .schedule import LinearDecay, PhasedSchedule, Schedule
from .training_config import TrainingConfig

MIN_FINETUNE_STEPS = 200
"""Fewer fine-tune optimizer steps than this get a warning (module docstring)."""


@dataclass
class PhasedSource:
    """One split of a cache seen both ways: shuffled token rows (``tokens``, an
    ActivationSource) and whole windows (``sequences``, a :class:`SequenceSource`)."""

    tokens: Any
    sequences: SequenceSource

    @property
    def d_in(self) -> int:
        return self.sequences.d_in

    @property
    def d_out(self) -> int:
        return self.sequences.d_out

    @property
    def num_tokens(self) -> int:
        return self.sequences.num_tokens

    @property
    def split(self) -> str:
        return self.sequences.split


class TwoPhaseObjective(Objective):
    """Local training, then an end-to-end fine-tune, as one objective (module docstring)."""

    def __init__(self, model: Any, config: TrainingConfig, **end_to_end_kwargs: Any):
        super().__init__(config)
        if not 0 < config.finetune_fraction < 1 or config.max_tokens is None:
            raise ValueError("TwoPhaseObjective needs 0 < finetune_fraction < 1 and max_tokens")
        ft_config = config
        if config.finetune_batch_sequences is not None:
            ft_config = config.replace(batch_size=config.finetune_batch_sequences)
        self.e2e = EndToEndObjective(model, ft_config, **end_to_end_kwargs)
        self.local = self.e2e.local  # one outlier cap for both phases
        self.steps_done = 0
        """Optimizer steps taken (checkpointed): decides the phase."""
        self._plan: Optional[tuple[int, int]] = None

    # -- the plan ------------------------------------------------------------------------------
    def phase_steps(self, source: PhasedSource) -> tuple[int, int]:
        """``(S1, S2)``: steps of the local phase and of the fine-tune."""
        if self._plan is None:
            budget = int(self.config.max_tokens)  # validated: set with finetune_fraction
            f = float(self.config.finetune_fraction)
            s1 = max(1, math.ceil((1.0 - f) * budget / self.config.train_batch_tokens))
            s2 = max(1, math.ceil(f * budget / self.e2e.tokens_per_step(source.sequences)))
            self._plan = (s1, s2)
        return self._plan

    def planned_steps(self, source: PhasedSource) -> int:
        return sum(self.phase_steps(source))

    def steps_per_epoch(self, source: PhasedSource) -> int:
        return self.planned_steps(source)  # the whole plan is one pass

    def schedule(self, base_lr: float, total_steps: int) -> PhasedSchedule:
        if self._plan is None:
            raise RuntimeError("schedule() before planned_steps()")
        s1, s2 = self._plan
        ft_lr = self.config.resolved_finetune_lr(base_lr)
        finetune = (LinearDecay(ft_lr, s2) if self.config.finetune_schedule == "linear"
                    else Schedule(self.config, ft_lr, s2))
        return PhasedSchedule([Schedule(self.config, base_lr, s1), finetune])

    def warnings(self, source: PhasedSource) -> list[str]:
        _, s2 = self.phase_steps(source)
        if s2 >= MIN_FINETUNE_STEPS:
            return []
        return [f"warning: a fine-tune of {s2} steps is too short to move the CE loss; the "
                "published recipe uses thousands"]

    def in_finetune(self) -> bool:
        return self._plan is not None and self.steps_done >= self._plan[0]

    # -- data ------------------------------------------------------------------------------------
    def iter_batches(self, source: PhasedSource, *, epoch: int, start_batch: int) -> Iterator[Any]:
        s1, s2 = self.phase_steps(source)
        if start_batch < s1:
            yield from _cycled(lambda e, b: self.local.iter_batches(source.tokens, epoch=e,
                                                                    start_batch=b),
                               self.local.steps_per_epoch(source.tokens), start_batch, s1)
            start_batch = s1
        yield from _cycled(lambda e, b: self.e2e.iter_batches(source.sequences, epoch=e,
                                                              start_batch=b),
                           self.e2e.steps_per_epoch(source.sequences), start_batch - s1, s2)

    def batch_tokens(self, batch: Any) -> int:
        return (self.e2e.batch_tokens(batch) if hasattr(batch, "train_mask")
                else self.local.batch_tokens(batch))

    def step_phase(self, batch: Any) -> str:
        return "finetune" if hasattr(batch, "train_mask") else "train"

    def tokens_per_step(self, source: PhasedSource) -> float:
        return float(self.config.max_tokens) / self.planned_steps(source)

    # -- the step --------------------------------------------------------------------------------
    def step(self, sae: SAE, batch: Any) -> StepOutput:
        self.steps_done += 1
        if hasattr(batch, "train_mask"):  # a SequenceBatch: the fine-tune
            return self.e2e.step(sae, batch)
        return self.local.step(sae, batch)

    # -- the rest of the seam --------------------------------------------------------------------
    def initialize(self, sae: SAE, source: PhasedSource, *, init_weights: bool = True) -> None:
        self.local.initialize(sae, source.tokens, init_weights=init_weights)

    def calibration_batches(self, train_source: PhasedSource) -> Iterator[Tensor]:
        return self.local.calibration_batches(train_source.tokens)

    def evaluate(self, sae: SAE, val_source: Any, max_tokens: Optional[int]) -> dict[str, Any]:
        """Reconstruction metrics in phase 1; from the fine-tune on, the end-to-end ones too.
        A bare SequenceSource (a test split) always gets the end-to-end evaluation."""
        if isinstance(val_source, SequenceSource):
            return self.e2e.evaluate(sae, val_source, max_tokens)
        if self.in_finetune():
            return self.e2e.evaluate(sae, val_source.sequences, max_tokens)
        return self.local.evaluate(sae, val_source.tokens, max_tokens)

    def describe(self, source: PhasedSource) -> str:
        s1, s2 = self.phase_steps(source)
        return (f"two phases: {s1} local steps on cached activations, then {s2} end-to-end "
                f"fine-tune steps ({self.config.finetune_fraction:.0%} of the tokens); "
                + self.e2e.describe(source.sequences))

    def state_dict(self) -> dict[str, Any]:
        return {**self.e2e.state_dict(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.e2e.load_state_dict(state)
        self.steps_done = int(state.get("steps_done", 0))


def _cycled(make: Any, per_epoch: int, start: int, stop: int) -> Iterator[Any]:
    """Batches ``start .. stop-1`` of a stream of epochs of ``per_epoch`` batches each
    (``make(epoch, start_batch)`` opens one epoch); epochs are reshuffled as usual."""
    index = start
    while index < stop:
        epoch, offset = divmod(index, per_epoch)
        for batch in make(epoch, offset):
            yield batch
            index += 1
            if index >= stop:
                return
        index = (epoch + 1) * per_epoch  # an epoch can end early (a short last batch)
