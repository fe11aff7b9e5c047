"""The evaluator seam: what an evaluator declares, what it receives, what it returns.

Evaluation of a trained SAE is a set of **evaluators**, one file each under
``trainer/evaluators/``, registered with ``@register_evaluator`` (registration.py) and imported by
``trainer/evaluators/__init__.py`` -- like the architectures (trainer/saes/). A job names the
ones it runs in ``training.evaluators`` (TrainingConfig; ``reconstruction`` always runs, and
``end_to_end`` whenever the objective is end-to-end); an unknown name is refused with the
closest known one. Nothing else lists evaluators or their metrics: the metrics record, the
field catalog (what a sweep may optimise, constrain or put on a Pareto axis), ``best``, the
model card, ``report`` and ``sae-sweep eval`` read them from the registry.

An evaluator is a subclass of :class:`Evaluator` with

* ``name`` -- its registered name (what ``training.evaluators`` lists);
* ``description`` -- one line for messages and docs;
* ``fields`` -- the :class:`MetricField`\\ s it adds to the metrics record: name, description,
  direction (``better``: ``"lower"``, ``"higher"`` or None when neither is better, e.g. ``l0``).
  A field that is not one of MetricsRecord's typed fields is stored in ``MetricsRecord.extra``
  (a float), and is at once a reported metric: a column of ``results.parquet`` (val) and of
  ``test_<field>`` (test), an objective, constraint or Pareto axis of a sweep, a column of
  ``best`` and a line of the card. Field names are unique across evaluators;
* ``needs`` -- the data it reads, in words from :data:`DATA_NEEDS` (documentation and
  messages; the check itself is ``prepare``);
* ``every_evaluation`` -- True (default): it runs at every evaluation (each ``log_freq`` /
  checkpoint record on val, so its fields can drive early stopping and ``save_best``); False:
  only at the **final** evaluations (the end-of-training val record, the reported test figures,
  ``sae-sweep eval``) -- for costly evaluators; their fields are then absent from
  intermediate records, so they cannot be ASHA's metric.

``enabled_by_default(config)`` (a classmethod; False unless overridden: reconstruction is on
for every job, end_to_end for an end-to-end objective) and ``order`` (where a default one runs),
and two methods:

* ``prepare(data: EvaluationData) -> None`` -- called once per job, **before training**
  (``EvaluationSuite.build``): check that the job's data can serve it and load what it needs
  once (ground-truth directions, probe activations...). When the data lacks something raise
  :class:`EvaluatorDataError` with one line naming the cache and what is missing (the CLI
  prints it, exit 2). ``data`` holds the job's cache reader (None for in-memory sources), its
  input and output hooks, the TrainingConfig and the objective.
* ``evaluate(sae, ctx: EvaluationContext) -> dict[str, Any]`` -- the figures of ``sae``, which
  is **the shipped model** (calibrated: what ``export`` writes; use ``sae.encode`` /
  ``sae.decode`` / ``sae(x)`` / ``sae.W_dec``, never a training encoding), on the split
  ``ctx.split`` (``val`` for selection, ``test`` for reported figures; the caller decides --
  an evaluator never picks a split itself). ``ctx.source`` is that split's source as the
  objective consumes it (token rows, or whole windows for an end-to-end objective),
  ``ctx.token_rows()`` the same split as token rows, ``ctx.max_tokens`` the token budget,
  ``ctx.final`` whether this is a final evaluation, ``ctx.objective_figures()`` the objective's
  own evaluation pass (computed once per context and shared: reconstruction, plus CE/KL for an
  end-to-end objective). Return only the fields it declares (``None``: not computed); anything
  else is an error. It must not change ``sae``.

The suite times each evaluator (``MetricsRecord.evaluator_seconds``, reported as
``evaluator_seconds/<name>``).

Adding an evaluator is one file here (its class, its maths, its fields) plus its import in
``__init__.py`` and its tests; nothing else changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

from activation_cache import UserError

BETTER = ("lower", "higher")
"""A field's direction: which way is better (None: neither)."""

DATA_NEEDS = {
    "tokens": "the split's token rows (every cache)",
    "end_to_end": "the end-to-end objective (training.use_end_to_end: the cache's model and "
                  "clean logits)",
    "ground_truth": "the cache's ground truth (a synthetic cache: `synthetic:` in its YAML)",
    "probes": "the cache's probe sets (`probes:` in its YAML)",
    "decoder": "the SAE's decoder rows only",
}
"""The words an evaluator's ``needs`` uses (add one here with a new kind of data)."""


class EvaluatorDataError(UserError):
    """A named evaluator cannot run on this job's data (the message says what is missing)."""


@dataclass(frozen=True)
class MetricField:
    """One figure an evaluator adds to the metrics record."""

    name: str
    """The record field (and the results column: ``name`` on val, ``test_<name>`` on test)."""
    description: str
    """One line: what it measures, in which units."""
    better: Optional[str] = None
    """``"lower"``, ``"higher"`` or None (neither is better: a budget such as ``l0``)."""
    numeric: bool = True
    """A single number (an objective or constraint may use it); False: e.g. a histogram."""
    bookkeeping: bool = False
    """A counter (e.g. ``eval_tokens``), not a figure of the SAE: never an objective."""
    headline: bool = False
    """The evaluator's headline figure: ``best`` shows it by default beside fvu / l0 /
    ce_loss_delta, and ``report`` plots it against L0 (its other fields: ``--all-columns``)."""

    def __post_init__(self) -> None:
        if self.better not in (None, *BETTER):
            raise ValueError(f"MetricField {self.name}: better must be one of {BETTER} or "
                             f"None, got {self.better!r}")


@dataclass
class EvaluationData:
    """What a job can give its evaluators (built once per job, before training)."""

    config: Any
    """The job's TrainingConfig."""
    reader: Any = None
    """The job's ``activation_cache.CacheReader`` (None: in-memory sources)."""
    hook: Optional[str] = None
    """The SAE's input hook in the cache."""
    target_hook: Optional[str] = None
    """The hook the SAE reconstructs (None: ``hook``)."""
    objective: Any = None
    """The job's objective (None: the default local objective)."""

    def cache_name(self) -> str:
        """The cache's path or URI, for messages."""
        return str(getattr(self.reader, "uri", None) or "the in-memory source")


@dataclass
class EvaluationContext:
    """One evaluation of one SAE on one split (what ``Evaluator.evaluate`` receives)."""

    split: str
    """``val`` (selection), ``test`` (reported) or ``train`` (no held-out data)."""
    source: Any
    """The split's source as the objective consumes it."""
    max_tokens: Optional[int]
    """Token budget of the evaluation (``TrainingConfig.eval_max_tokens``; None: all)."""
    final: bool
    """A final evaluation (end of training, reported split, ``sae-sweep eval``)."""
    data: EvaluationData
    """The job's data (``prepare`` saw the same object)."""
    _objective_pass: Optional[Callable[[], dict[str, Any]]] = None
    _objective_figures: Optional[dict[str, Any]] = field(default=None, repr=False)

    def objective_figures(self) -> dict[str, Any]:
        """The objective's evaluation of ``source`` (``Objective.evaluate``), computed on the
        first call and shared by every evaluator of this context."""
        if self._objective_figures is None:
            self._objective_figures = (dict(self._objective_pass())
                                       if self._objective_pass is not None else {})
        return self._objective_figures

    def token_rows(self) -> Any:
        """The split as an ActivationSource of token rows (a whole-window source's
        ``token_source()``; a token source as it is)."""
        if hasattr(self.source, "iter_batches"):
            return self.source
        return self.source.token_source()


class Evaluator(ABC):
    """Base class of evaluators (see the module docstring for the seam)."""

    name: ClassVar[str]
    description: ClassVar[str]
    fields: ClassVar[tuple[MetricField, ...]]
    needs: ClassVar[tuple[str, ...]] = ("tokens",)
    every_evaluation: ClassVar[bool] = True
    order: ClassVar[int] = 100
    """Where it runs among the evaluators on by default (lower first)."""

    @classmethod
    def enabled_by_default(cls, config: Any) -> bool:
        """Whether it runs for ``config`` (a TrainingConfig) without being named
        (reconstruction: always; end_to_end: with an end-to-end objective)."""
        return False

    def prepare(self, data: EvaluationData) -> None:
        """Check ``data`` can serve this evaluator and load what it needs (before training);
        raise EvaluatorDataError (one line) when it cannot."""

    @abstractmethod
    def evaluate(self, sae: Any, ctx: EvaluationContext) -> dict[str, Any]:
        """The declared fields of the shipped ``sae`` on ``ctx.split``."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in cls.fields)
