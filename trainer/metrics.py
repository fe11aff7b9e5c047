"""MetricsRecord: one typed record per evaluation, and the reconstruction-metric helpers.

Definitions (SAEBench / SAELens conventions):

* ``explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the evaluation
  tokens (mean over those tokens); ``fvu = 1 - explained_variance``.
* ``mse``: mean over tokens and dimensions of ``(x - x_hat)^2`` in raw activation units.
* Every headline figure (``mse``, ``fvu``, ``explained_variance``, ``l0``, ``dead_fraction``,
  ``dense_fraction``, the CE/KL metrics) uses the **shipped encoder** (``sae.encode``, what
  ``export`` writes; BatchTopK: the calibrated threshold, one token at a time).
* ``l0_train``: mean active latents per token with the training encoding (BatchTopK: over the
  batch); ``mse_train`` / ``fvu_train`` / ``explained_variance_train``: that encoding's
  reconstruction, for the architectures whose training encoding differs (None otherwise).
* ``dead_fraction``: latents that never fired on the evaluation tokens; ``dense_fraction``: latents
  firing on more than 10 % of them; ``density_histogram``: counts of live latents per decade of
  firing frequency, bins ``DENSITY_BIN_EDGES`` (log10; the first bin also takes anything lower).

The end-to-end fields are filled by ``EndToEndObjective`` (None otherwise).

Which evaluator adds which field, its description and its direction are declared by the
evaluators (trainer/evaluators/): the typed fields below are those of ``reconstruction`` and
``end_to_end``; a field another evaluator declares (``feature_mcc``, ...) lives in ``extra``
(``record.get(name)``, ``record.set_metric(name, value)``; ``scalars()`` lists it by name).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .errors import CheckpointMismatchError

DENSE_FREQUENCY = 0.1
_BOOKKEEPING = {"bookkeeping": True}
"""Field metadata: a counter or timing, not a figure of the SAE (not an objective)."""
_PROGRESS = {"bookkeeping": True, "training_run": True}
"""Field metadata: a counter or timing of the training run (not of an evaluation)."""
_TRAINING_STATE = {"training_run": True}
"""Field metadata: a figure of the training state, not of the evaluation tokens."""
_END_TO_END = {"end_to_end": True}
"""Field metadata: computed only by end-to-end evaluation (the SAE spliced into the model)."""
DENSITY_BIN_EDGES: tuple[float, ...] = (-8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0)


@dataclass
class MetricsRecord:
    """Everything known about the SAE at one evaluation point (step)."""

    step: int = field(metadata=_PROGRESS)
    """Optimizer steps taken so far."""
    tokens_seen: int = field(metadata=_PROGRESS)
    """Training tokens consumed so far."""
    epoch: int = field(default=0, metadata=_PROGRESS)
    """Epoch (0-based) the step belongs to."""
    lr: Optional[float] = field(default=None, metadata=_PROGRESS)
    """Learning rate of the last step."""
    # -- training-loss terms, averaged over the steps since the previous record ------------
    loss: Optional[float] = field(default=None, metadata=_TRAINING_STATE)
    """Mean total training loss."""
    loss_terms: dict[str, float] = field(default_factory=dict)
    """Mean of each term/statistic the objective reports (``mse``, ``l1``, ``aux``, ...)."""
    # -- reconstruction on the validation tokens -------------------------------------------
    eval_tokens: int = field(default=0, metadata=_BOOKKEEPING)
    """Number of validation tokens the metrics below were computed on (0: no validation)."""
    eval_split: Optional[str] = None
    """The split the metrics below were computed on (``val`` during training, ``test`` for the
    final record of a sweep trial / ``sae-sweep eval``)."""
    mse: Optional[float] = None
    fvu: Optional[float] = None
    explained_variance: Optional[float] = None
    l0: Optional[float] = None
    """Mean active latents per token of the shipped encoder."""
    l0_train: Optional[float] = None
    """... of the training encoding (BatchTopK: over the batch)."""
    mse_train: Optional[float] = None
    """``mse`` with the training encoding (architectures whose training encoding differs)."""
    fvu_train: Optional[float] = None
    explained_variance_train: Optional[float] = None
    dead_fraction: Optional[float] = None
    dense_fraction: Optional[float] = None
    density_histogram: Optional[list[int]] = None
    dead_fraction_train: Optional[float] = field(default=None, metadata=_TRAINING_STATE)
    """Latents idle for ``n_batches_to_dead`` training batches (the AuxK notion of dead)."""
    threshold: Optional[float] = None
    """The shipped encoder's inference threshold (BatchTopK: theta; JumpReLU: the mean of the
    per-latent thresholds; None for architectures without one)."""
    # -- end-to-end (filled by EndToEndObjective) ----------------------------------------
    ce_loss_clean: Optional[float] = field(default=None, metadata=_END_TO_END)
    ce_loss_spliced: Optional[float] = field(default=None, metadata=_END_TO_END)
    ce_loss_zero_ablation: Optional[float] = field(default=None, metadata=_END_TO_END)
    ce_loss_delta: Optional[float] = field(default=None, metadata=_END_TO_END)
    ce_loss_score: Optional[float] = field(default=None, metadata=_END_TO_END)
    kl_div: Optional[float] = field(default=None, metadata=_END_TO_END)
    top1_agreement: Optional[float] = field(default=None, metadata=_END_TO_END)
    block_mse: Optional[float] = field(default=None, metadata=_END_TO_END)
    # -- figures of the other evaluators (trainer/evaluators/) ------------------------------
    extra: dict[str, float] = field(default_factory=dict)
    """Figures declared by evaluators that have no typed field here, by field name."""
    evaluator_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each evaluator took at this evaluation (reported as
    ``evaluator_seconds/<name>``)."""
    # -- timing ----------------------------------------------------------------------------
    elapsed_s: Optional[float] = field(default=None, metadata=_PROGRESS)
    tokens_per_s: Optional[float] = field(default=None, metadata=_PROGRESS)
    """Training throughput since the previous record."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MetricsRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointMismatchError(
                f"MetricsRecord: unknown field(s) {', '.join(unknown)} "
                "(written by a newer version?)"
            )
        return cls(**dict(data))

    def get(self, name: str) -> Any:
        """The value of field ``name``: a typed field, else an evaluator's figure in ``extra``
        (None when absent)."""
        if name in _TYPED:
            return getattr(self, name)
        return self.extra.get(name)

    def set_metric(self, name: str, value: Any) -> None:
        """Set field ``name``: a typed field, else ``extra[name]`` (callers pass only fields
        an evaluator declares: trainer.evaluators checks)."""
        if name in _TYPED:
            setattr(self, name, value)
        elif value is None:
            self.extra.pop(name, None)
        else:
            self.extra[name] = float(value)

    def scalars(self) -> dict[str, float]:
        """Flat ``name -> number`` view (loss terms as ``loss/<name>``), Nones left out."""
        out: dict[str, float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, (int, float)):
                out[f.name] = value
        for name, value in self.loss_terms.items():
            out[f"loss/{name}"] = value
        for name, value in self.extra.items():
            if value is not None:
                out[name] = value
        for name, value in self.evaluator_seconds.items():
            out[f"evaluator_seconds/{name}"] = value
        return out


_TYPED = frozenset(f.name for f in dataclasses.fields(MetricsRecord))
"""MetricsRecord's typed fields (anything else an evaluator declares lives in ``extra``)."""


def numeric_fields() -> tuple[str, ...]:
    """Every MetricsRecord field holding one number (read from the type hints, not strings)."""
    hints = typing.get_type_hints(MetricsRecord)
    out = []
    for f in dataclasses.fields(MetricsRecord):
        args = set(typing.get_args(hints[f.name])) - {type(None)}
        if hints[f.name] in (int, float) or (args and args <= {int, float}):
            out.append(f.name)
    return tuple(out)


def bookkeeping_metric_names() -> tuple[str, ...]:
    """MetricsRecord fields that are counters or timings (step, tokens, lr, time), not figures
    of the SAE."""
    return tuple(f.name for f in dataclasses.fields(MetricsRecord) if f.metadata.get("bookkeeping"))


def evaluation_metric_names() -> tuple[str, ...]:
    """The numeric MetricsRecord fields an evaluation on held-out tokens fills (everything but
    the training run's counters, timings and training state)."""
    skip = {f.name for f in dataclasses.fields(MetricsRecord) if f.metadata.get("training_run")}
    return tuple(n for n in numeric_fields() if n not in skip)


def end_to_end_metric_names() -> tuple[str, ...]:
    """MetricsRecord fields that only end-to-end evaluation computes (CE, KL, top-1...)."""
    return tuple(f.name for f in dataclasses.fields(MetricsRecord) if f.metadata.get("end_to_end"))


def numeric_metric_names() -> tuple[str, ...]:
    """Names of the MetricsRecord fields that can serve as a 'best' metric or an objective
    (the numeric ones, less the bookkeeping counters)."""
    skip = set(bookkeeping_metric_names())
    return tuple(n for n in numeric_fields() if n not in skip)


class ReconstructionAccumulator:
    """Streams batches of (x, x_hat) and returns mse / fvu / explained_variance in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.d = 0
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum: Optional[Tensor] = None

    def add(self, x: Tensor, x_hat: Tensor) -> None:
        x64 = x.detach().reshape(-1, x.shape[-1]).double()
        err = x64 - x_hat.detach().reshape(-1, x.shape[-1]).double()
        self.n += x64.shape[0]
        self.d = x64.shape[1]
        self.sse += float(err.pow(2).sum())
        self.sum_sq += float(x64.pow(2).sum())
        s = x64.sum(0)
        self.sum = s if self.sum is None else self.sum + s

    def result(self) -> dict[str, float]:
        if self.n == 0 or self.sum is None:
            return {}
        total_var = self.sum_sq - float(self.sum.pow(2).sum()) / self.n
        ev = 1.0 - self.sse / total_var if total_var > 0 else float("nan")
        return {"mse": self.sse / (self.n * self.d), "explained_variance": ev, "fvu": 1.0 - ev}


def density_summary(fire_counts: Tensor, n_tokens: int) -> dict[str, Any]:
    """dead_fraction, dense_fraction and density_histogram from per-latent firing counts."""
    counts = fire_counts.double()
    d_sae = counts.numel()
    freq = counts / max(n_tokens, 1)
    live = freq[counts > 0]
    log_freq = torch.log10(live).clamp(min=DENSITY_BIN_EDGES[0], max=DENSITY_BIN_EDGES[-1])
    hist = []
    edges = DENSITY_BIN_EDGES
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        upper = log_freq <= hi if i == len(edges) - 2 else log_freq < hi
        hist.append(int(((log_freq >= lo) & upper).sum()))
    return {
        "dead_fraction": float((counts == 0).sum()) / d_sae,
        "dense_fraction": float((freq > DENSE_FREQUENCY).sum()) / d_sae,
        "density_histogram": hist,
    }
