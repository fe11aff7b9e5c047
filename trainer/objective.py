"""The objective seam: what one training step computes, and how a run is evaluated.

The training loop (trainer/training.py) owns the optimizer, schedule, clipping, decoder
projection/renormalisation, dead tracking, validation cadence, checkpoints and resume. An
``Objective`` owns the data-dependent parts:

* ``step(sae, batch) -> StepOutput(loss, stats, fired)`` -- required. ``stats`` values are
  floats or detached 0-d tensors (the loop converts them only when it reports, so a step costs
  no host syncs for logging); ``fired`` is a bool [d_sae] mask of latents active in the batch.
* ``evaluate(sae, val_source, max_tokens) -> dict`` -- required; its keys are MetricsRecord
  fields and are merged into the record.
* ``iter_batches``, ``steps_per_epoch``, ``batch_tokens``, ``tokens_per_step``, ``warnings``,
  ``initialize``, ``finalize``, ``state_dict`` / ``load_state_dict`` -- optional hooks with token-batch
  defaults here.

``LocalObjective`` is the default: ``reconstruction_loss_weight`` x the architecture's
reconstruction term + the architecture's own penalties (its ``TrainStepOutput``: L1, AuxK, L0...
with its own coefficients), on shuffled ``TokenBatch(input, target)`` rows from an
ActivationSource, with the norm-outlier policy applied to training batches (decided on the
input's norms; a dropped token leaves input and target). No objective knows which architecture
it trains: everything architecture-specific comes from ``sae.training_forward(input, target)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from .device import to_device
from .errors import EmptySourceError, NonFiniteActivationError
from .schedule import Schedule
from .evaluators.reconstruction import evaluate_reconstruction
from .saes.base import SAE, TrainStepOutput
from .sources import ActivationSource, TokenBatch
from .training_config import TrainingConfig


class StepOutput(NamedTuple):
    loss: Tensor
    """Scalar loss to backpropagate."""
    stats: dict[str, Any]
    """Per-step statistics (floats or detached 0-d tensors), averaged between reports."""
    fired: Tensor
    """bool [d_sae]: latents that fired in this batch (dead-latent tracking)."""
    running: Optional[dict[str, Any]] = None
    """The architecture's running statistics of this step (``TrainStepOutput.running``, merged
    over chunks), applied by ``sae.update_training_state`` after the optimizer step."""


def noop_step(sae: SAE, stats: Optional[dict[str, Any]] = None) -> StepOutput:
    """A step that changes nothing (no usable tokens in the batch): a zero loss still connected
    to every parameter, so the loop's backward/step run as usual, and no latent fired."""
    zero = sum(p.sum() * 0.0 for p in sae.parameters())
    return StepOutput(zero, stats or {},
                      torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.W_enc.device))


class Objective(ABC):
    """Base class of training objectives (see the module docstring)."""

    def __init__(self, config: TrainingConfig):
        self.config = config

    @abstractmethod
    def step(self, sae: SAE, batch: Any) -> StepOutput:
        """Forward one training batch and return the loss to minimise."""

    @abstractmethod
    def evaluate(self, sae: SAE, val_source: Any, max_tokens: Optional[int]) -> dict[str, Any]:
        """Metrics (MetricsRecord field -> value) on held-out data."""

    # -- optional hooks (defaults: token batches from an ActivationSource) ------------------
    def iter_batches(self, source: Any, *, epoch: int, start_batch: int) -> Iterator[Any]:
        return source.iter_batches(self.config.train_batch_tokens, seed=self.config.seed,
                                   epoch=epoch, start_batch=start_batch)

    def steps_per_epoch(self, source: Any) -> int:
        return max(1, math.ceil(source.num_tokens / self.config.train_batch_tokens))

    def batch_tokens(self, batch: Any) -> int:
        """Source tokens a batch consumed (counts toward ``max_tokens``)."""
        return int(batch.input.shape[0])

    def step_phase(self, batch: Any) -> str:
        """The timing phase (``trainer.timing``) of a training step on ``batch``: ``train``
        (a two-phase objective names its end-to-end steps ``finetune``)."""
        return "train"

    def tokens_per_step(self, source: Any) -> float:
        """Tokens one step is expected to consume: turns ``max_tokens`` into a step count for
        the learning-rate schedule (the loop still stops on the tokens actually seen)."""
        return float(self.config.train_batch_tokens)

    def planned_steps(self, source: Any) -> Optional[int]:
        """The run's step count when the objective plans it itself (e.g. two phases); None:
        the loop derives it from epochs and ``max_tokens`` and stops on the tokens seen."""
        return None

    def schedule(self, base_lr: float, total_steps: int) -> Any:
        """The learning-rate schedule of the run (an object with ``lr(step)``)."""
        return Schedule(self.config, base_lr, total_steps)

    def warnings(self, source: Any) -> list[str]:
        """One-line warnings about the planned run (e.g. a fine-tune too short to matter); the
        loop reports each through the reporter before the first step."""
        return []

    def initialize(self, sae: SAE, source: Any, *, init_weights: bool = True) -> None:
        """Called once at the start of a fresh (not resumed) run, before the first step.
        ``init_weights`` is False when the SAE is already trained (continue, don't restart):
        then only the objective's own state (e.g. the outlier cap) comes from the data."""

    def finalize(self, sae: SAE, train_source: Any, val_source: Any) -> Optional[str]:
        """Called once after the last step; may return a message for the reporter."""
        return None

    def calibration_batches(self, train_source: Any) -> Iterator[Tensor]:
        """Raw input rows for calibrating the inference encoding (the encoder reads the input):
        training tokens in their own order (seed + 1), so no reported or selection metric is
        computed on them (those use the validation and test splits) and the training order is
        untouched."""
        return (b.input for b in train_source.iter_batches(self.config.train_batch_tokens,
                                                           seed=self.config.seed + 1, epoch=0))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


def weighted_sae_loss(config: Any, out: TrainStepOutput) -> tuple[Tensor, dict[str, Any]]:
    """The SAE's own loss from its training forward, and the step's stats:
    ``reconstruction_loss_weight x reconstruction_loss + sparsity_loss`` (the architecture's
    penalties, already weighted by its own coefficients); stats are its named terms and l0."""
    loss = config.reconstruction_loss_weight * out.reconstruction_loss + out.sparsity_loss
    stats: dict[str, Any] = dict(out.terms)
    stats["l0"] = out.l0
    return loss, stats


class LocalObjective(Objective):
    """Reconstruction (+ L1 or AuxK) on shuffled token rows (module docstring)."""

    def __init__(self, config: TrainingConfig):
        super().__init__(config)
        self.outlier_cap: Optional[float] = None
        """Raw-norm cap for the outlier policy (from the initialisation tokens)."""

    # -- data ------------------------------------------------------------------------------------
    def _initial_tokens(self, source: ActivationSource) -> TokenBatch:
        inputs, targets, total = [], [], 0
        autoencodes = True
        for batch in source.iter_batches(self.config.train_batch_tokens, seed=self.config.seed,
                                         epoch=0):
            take = batch.rows(slice(0, self.config.init_tokens - total))
            autoencodes = autoencodes and take.autoencodes
            inputs.append(take.input)
            targets.append(take.target)
            total += take.input.shape[0]
            if total >= self.config.init_tokens:
                break
        if total == 0:
            raise EmptySourceError("the training source yielded no tokens")
        x = torch.cat(inputs).float()
        y = x if autoencodes else torch.cat(targets).float()
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise NonFiniteActivationError(
                "the training activations contain NaN or inf (found in the first "
                f"{total} tokens, used for initialisation); fix the cache before training"
            )
        return TokenBatch(x, y)

    def initialize(self, sae: SAE, source: Any, *, init_weights: bool = True) -> None:
        """Outlier cap from the median input norm, then (unless the SAE is already trained)
        the scales and b_dec from the rest."""
        batch = self._initial_tokens(source)
        if self.config.outlier_policy != "none":
            median = float(batch.input.norm(dim=1).median())
            self.outlier_cap = self.config.outlier_norm_multiple * median if median > 0 else None
            if self.outlier_cap is not None:
                batch = self._apply_outlier_policy(batch)
        if init_weights:
            sae.initialize_from_data(batch.input, batch.target, b_dec_init=self.config.b_dec_init,
                                     scale_inputs=self.config.scale_inputs)

    def _apply_outlier_policy(self, batch: TokenBatch,
                              norms: Optional[Tensor] = None) -> TokenBatch:
        """The policy on the input's norms: ``drop`` leaves out a token's input and target
        rows; ``clip`` clips the input (an SAE's target is its input, so it is clipped too)."""
        if self.outlier_cap is None or self.config.outlier_policy == "none":
            return batch
        x = batch.input
        if norms is None:
            norms = x.norm(dim=1)
        if self.config.outlier_policy == "drop":
            keep = norms <= self.outlier_cap
            return batch if bool(keep.all()) else batch.rows(keep)  # no copy in the common case
        clipped = x * (self.outlier_cap / norms.clamp_min(self.outlier_cap)).unsqueeze(1)
        return TokenBatch(clipped, clipped if batch.autoencodes else batch.target)

    def state_dict(self) -> dict[str, Any]:
        return {"outlier_cap": self.outlier_cap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outlier_cap = state.get("outlier_cap")

    # -- the step --------------------------------------------------------------------------------
    def step(self, sae: SAE, batch: TokenBatch) -> StepOutput:
        # a storage-dtype (fp16/bf16) batch travels as is and is converted on the device
        x = to_device(batch.input, sae.W_enc.device, dtype=torch.float32)
        y = x if batch.autoencodes else to_device(batch.target, sae.W_enc.device,
                                                  dtype=torch.float32)
        batch = TokenBatch(x, y)
        # one pass over the batch gives the finiteness check (a NaN/inf makes its row's norm
        # NaN/inf) and the norms the outlier policy and the explained-variance stat need
        norms = x.float().norm(dim=1)
        target_norms = norms if batch.autoencodes else y.float().norm(dim=1)
        finite = torch.isfinite(norms)
        if not batch.autoencodes:
            finite &= torch.isfinite(target_norms)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NonFiniteActivationError(
                f"{bad} of {x.shape[0]} activation rows contain NaN or inf; "
                "not training on them (check the cache / model dtype)"
            )
        n_in = x.shape[0]
        if self.outlier_cap is not None and self.config.outlier_policy != "none":
            kept = self._apply_outlier_policy(batch, norms)
            if kept is not batch:
                batch = kept
                if batch.autoencodes:
                    target_norms = batch.target.float().norm(dim=1)
                elif self.config.outlier_policy == "drop":
                    target_norms = target_norms[norms <= self.outlier_cap]
        if batch.input.shape[0] == 0:  # every token was an outlier: a no-op step
            return noop_step(sae, {"outlier_fraction": 1.0})
        out = sae.training_forward(batch.input, batch.target)
        cfg = self.config
        loss, stats = weighted_sae_loss(cfg, out)
        with torch.no_grad():
            # explained variance of the target without another pass over y - y_hat:
            # SSE = mse * N * d; total = sum ||y_s||^2 - N ||mean(y_s)||^2 (in float64)
            ys = out.target_scaled
            n, d = ys.shape
            scale2 = sae.output_scaling().double() ** 2
            total = (target_norms.double().pow(2).sum() * scale2
                     - n * ys.mean(0).double().pow(2).sum())
            sse = stats["mse"].double() * (n * d)
            stats["explained_variance"] = 1.0 - sse / total.clamp_min(1e-30)
        if cfg.outlier_policy == "drop" and self.outlier_cap is not None:
            stats["outlier_fraction"] = 1.0 - batch.input.shape[0] / n_in
        return StepOutput(loss, stats, out.fired, out.running)

    # -- evaluation and the end of training --------------------------------------------------------
    def evaluate(self, sae: SAE, val_source: Any, max_tokens: Optional[int]) -> dict[str, Any]:
        return evaluate_reconstruction(sae, val_source, max_tokens=max_tokens,
                                       batch_tokens=self.config.train_batch_tokens)
