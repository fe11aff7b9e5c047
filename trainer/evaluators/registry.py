"""The evaluator registry: name -> Evaluator class, the fields they declare, and the suite a job
runs.

Evaluator files register with ``@register_evaluator`` (registration.py) and are imported by
``trainer/evaluators/__init__.py``; nothing else lists evaluators or their metrics. Here:

* :func:`evaluator_names`, :func:`evaluator_class` (an unknown name is a one-line ConfigError
  with the closest known name), :func:`check_evaluator_names`;
* :func:`declared_fields` -- every field any evaluator declares (name -> MetricField) and
  :func:`field_evaluator` (which evaluator adds a field); :func:`objective_metric_names`
  (MetricsRecord's numeric figures plus every declared numeric figure: what ``best_metric``, a
  sweep objective, a constraint or a Pareto axis may name);
* :func:`resolve_evaluators` -- the evaluators a TrainingConfig runs, in order;
* :class:`EvaluationSuite` -- those evaluators prepared on a job's data (before training), run
  on one split at a time.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from typing import Any, Callable, Iterable, Optional

import torch

from activation_cache import ConfigError

from ..metrics import MetricsRecord, numeric_metric_names
from .base import EvaluationContext, EvaluationData, Evaluator, MetricField
from .registration import REGISTERED


def evaluator_names() -> list[str]:
    """Every registered evaluator, by ``order`` then name (reconstruction first)."""
    return sorted(REGISTERED, key=lambda n: (REGISTERED[n].order, n))


def evaluator_class(name: str, *, where: str = "TrainingConfig.evaluators") -> "type[Evaluator]":
    """The class of evaluator ``name`` (a one-line ConfigError naming ``where`` otherwise)."""
    if name not in REGISTERED:
        names = evaluator_names()
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown evaluator {name!r}{hint}; known: "
                          f"{', '.join(names)}")
    return REGISTERED[name]


def check_evaluator_names(names: Iterable[Any], *, where: str = "TrainingConfig.evaluators"
                          ) -> None:
    """ConfigError unless every name is a registered evaluator (listed once)."""
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{where}: evaluator names are strings, got {name!r}")
        evaluator_class(name, where=where)
        if name in seen:
            raise ConfigError(f"{where}: lists evaluator {name!r} twice")
        seen.add(name)


def declared_fields() -> dict[str, MetricField]:
    """Every field an evaluator declares, by name (in evaluator order)."""
    return {f.name: f for n in evaluator_names() for f in REGISTERED[n].fields}


def field_evaluator(field: str) -> Optional[str]:
    """The evaluator that adds ``field`` (None: a field no evaluator declares)."""
    for name in evaluator_names():
        if field in REGISTERED[name].field_names():
            return name
    return None


def record_field_names() -> frozenset[str]:
    """MetricsRecord's typed fields (a declared field outside them goes to ``extra``)."""
    return frozenset(f.name for f in dataclasses.fields(MetricsRecord))


def extra_metric_names() -> tuple[str, ...]:
    """Declared numeric fields that are not typed MetricsRecord fields (stored in ``extra``)."""
    typed = record_field_names()
    return tuple(n for n, f in declared_fields().items() if f.numeric and n not in typed)


def headline_metric_names() -> tuple[str, ...]:
    """Each evaluator's headline fields (``MetricField.headline``), in registry order."""
    return tuple(n for n, f in declared_fields().items() if f.headline)


def objective_metric_names() -> tuple[str, ...]:
    """What ``best_metric``, a sweep objective, a constraint or a Pareto axis may name:
    MetricsRecord's numeric figures and every declared numeric, non-bookkeeping field."""
    fields = declared_fields()
    extra = tuple(n for n in extra_metric_names() if not fields[n].bookkeeping)
    return tuple(numeric_metric_names()) + extra


def final_only_metric_names() -> tuple[str, ...]:
    """Fields of evaluators that run only at final evaluations (absent from intermediate
    records: not ASHA's metric)."""
    return tuple(f.name for n in evaluator_names() if not REGISTERED[n].every_evaluation
                 for f in REGISTERED[n].fields)


def resolve_evaluators(config: Any) -> tuple[str, ...]:
    """The evaluators ``config`` (a TrainingConfig) runs, in order: those on by default for it
    (``Evaluator.enabled_by_default``: reconstruction always, end_to_end with an end-to-end
    objective), then ``config.evaluators`` in its order."""
    names = [n for n in evaluator_names() if REGISTERED[n].enabled_by_default(config)]
    for name in getattr(config, "evaluators", None) or ():
        evaluator_class(name)
        if name not in names:
            names.append(name)
    return tuple(names)


class EvaluationSuite:
    """The evaluators of one job, prepared on its data; ``evaluate`` runs them on a split."""

    def __init__(self, evaluators: list[Evaluator], data: EvaluationData):
        self.evaluators, self.data = evaluators, data

    @classmethod
    def build(cls, config: Any, *, reader: Any = None, hook: Optional[str] = None,
              target_hook: Optional[str] = None, objective: Any = None) -> "EvaluationSuite":
        """The suite ``config`` names (:func:`resolve_evaluators`), each ``prepare``\\ d on the
        job's data -- an EvaluatorDataError (one line) when the data lacks what one needs,
        before any training."""
        data = EvaluationData(config=config, reader=reader, hook=hook, target_hook=target_hook,
                              objective=objective)
        evaluators = [evaluator_class(n)() for n in resolve_evaluators(config)]
        for ev in evaluators:
            ev.prepare(data)
        return cls(evaluators, data)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(ev.name for ev in self.evaluators)

    @torch.no_grad()
    def evaluate(self, sae: Any, source: Any, *, split: str, max_tokens: Optional[int],
                 final: bool, objective_pass: Optional[Callable[[], dict[str, Any]]] = None
                 ) -> tuple[dict[str, Any], dict[str, float]]:
        """``(figures, seconds)``: every evaluator's declared figures of the shipped ``sae`` on
        ``source`` (split ``split``), and the seconds each took. ``objective_pass`` computes
        the objective's own evaluation (``ctx.objective_figures()``). Evaluators that run only
        at final evaluations are skipped unless ``final``."""
        ctx = EvaluationContext(split=split, source=source, max_tokens=max_tokens, final=final,
                                data=self.data, _objective_pass=objective_pass)
        figures: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        for ev in self.evaluators:
            if not (ev.every_evaluation or final):
                continue
            started = time.perf_counter()
            out = ev.evaluate(sae, ctx)
            seconds[ev.name] = time.perf_counter() - started
            unknown = sorted(set(out) - set(ev.field_names()))
            if unknown:
                raise ValueError(f"evaluator {ev.name!r} returned undeclared field(s) "
                                 f"{', '.join(unknown)}")
            figures.update({k: v for k, v in out.items() if v is not None})
        return figures, seconds


def apply_figures(record: MetricsRecord, figures: dict[str, Any],
                  seconds: Optional[dict[str, float]] = None) -> MetricsRecord:
    """Write an evaluation's figures into ``record`` (typed fields, else ``extra``)."""
    for key, value in figures.items():
        record.set_metric(key, value)
    if seconds:
        record.evaluator_seconds.update(seconds)
    return record
