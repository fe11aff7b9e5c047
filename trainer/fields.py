"""``field_catalog()``: everything a caller (the sweep) asks about architectures and fields.

One call, one plain, picklable answer (:class:`FieldCatalog`): which architectures exist and
which is the default, which fields each owns, which of them a sweep may search and which the
define-by-run space caps by the width, the common SAE fields and those the data sets, the
training fields, which config a field belongs to, the evaluators and the metric names (all of
them, the bookkeeping ones, the end-to-end ones; which evaluator adds each, its description and
which direction is better). The sweep keeps no copy of any of it: it asks here, so
a new architecture (one file under ``trainer/saes/``) or a new metric needs nothing in the sweep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

from . import evaluators as evaluator_registry
from . import registry
from .metrics import (bookkeeping_metric_names, end_to_end_metric_names,
                      evaluation_metric_names, numeric_fields)
from .sae_config import SAEConfig, common_field_names
from .training_config import TrainingConfig

EXPANSION_FACTOR = "expansion_factor"
"""A width written relative to the input: ``d_sae = round(expansion_factor * d_in)``."""


@dataclass(frozen=True)
class FieldCatalog:
    """The trainer's answer about architectures, fields and metrics (module docstring)."""

    architectures: tuple[str, ...]
    """Every registered architecture, sorted."""
    default_architecture: str
    """``SAEConfig``'s default architecture."""
    owned: Mapping[str, tuple[str, ...]]
    """Architecture -> the fields it owns (its options)."""
    searchable: Mapping[str, tuple[str, ...]]
    """Architecture -> its own fields a sweep may search (numeric ones)."""
    width_capped: Mapping[str, Mapping[str, int]]
    """Architecture -> {field: offset}: the field is drawn at most ``d_sae - offset``."""
    transcoders: tuple[str, ...]
    """Architectures whose output hook differs from their input (``hook_name_out``/``d_out``)."""
    common_sae_fields: tuple[str, ...]
    """Fields every SAEConfig has."""
    data_fields: tuple[str, ...]
    """SAEConfig fields the data decides (widths and hooks): set from the cache, never searched."""
    training_fields: tuple[str, ...]
    """TrainingConfig's fields."""
    metrics: tuple[str, ...]
    """Every numeric MetricsRecord field (what a report carries)."""
    objective_metrics: tuple[str, ...]
    """The numeric figures an objective, a constraint or ``best_metric`` may use."""
    bookkeeping_metrics: tuple[str, ...]
    """Counters and timings of a record (step, tokens, lr, time)."""
    evaluation_metrics: tuple[str, ...]
    """The figures an evaluation on held-out tokens fills (not the training run's)."""
    end_to_end_metrics: tuple[str, ...]
    """Figures only end-to-end evaluation computes."""
    evaluators: tuple[str, ...] = ()
    """Every registered evaluator (trainer/evaluators/), reconstruction first."""
    metric_evaluator: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Field -> the evaluator that adds it."""
    metric_better: Mapping[str, Optional[str]] = dataclasses.field(default_factory=dict)
    """Field -> ``"lower"`` / ``"higher"`` (which is better) or None."""
    metric_descriptions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Field -> one line saying what it measures."""
    default_evaluators: tuple[str, ...] = ()
    """Evaluators every job runs without naming them (reconstruction)."""
    plugin_metrics: tuple[str, ...] = ()
    """Numeric fields of evaluators that have no typed MetricsRecord field (``feature_mcc``,
    probing...): what ``best``, the card and ``report`` add when a table has them."""
    headline_metrics: tuple[str, ...] = ()
    """Each evaluator's headline field (``feature_mcc``, ``probe_accuracy_k1``): what ``best``
    shows by default and ``report`` plots, of ``plugin_metrics``."""
    final_only_metrics: tuple[str, ...] = ()
    """Fields absent from intermediate records (their evaluator runs at final evaluations)."""

    def metric_needs_evaluator(self, metric: str) -> Optional[str]:
        """The evaluator a job must run for ``metric`` to be reported, when it is not one of
        ``default_evaluators`` (None: always reported or not an evaluator's field)."""
        name = self.metric_evaluator.get(metric)
        return None if name is None or name in self.default_evaluators else name

    # -- derived answers ---------------------------------------------------------------------
    @property
    def architecture_fields(self) -> frozenset[str]:
        """Every field some architecture owns."""
        return frozenset(f for fields in self.owned.values() for f in fields)

    @property
    def sae_fields(self) -> frozenset[str]:
        """Every field an ``sae:`` block may name (common ones and every architecture's)."""
        return frozenset(self.common_sae_fields) | self.architecture_fields

    @property
    def searchable_fields(self) -> frozenset[str]:
        """Every field a search space may name: the common SAE fields (less the data's), every
        architecture's searchable fields, every training field, and ``expansion_factor``."""
        own = {f for fields in self.searchable.values() for f in fields}
        return ((frozenset(self.common_sae_fields) | own | frozenset(self.training_fields)
                 | {EXPANSION_FACTOR}) - frozenset(self.data_fields))

    def owners(self, field: str) -> tuple[str, ...]:
        """Architectures that own ``field`` (empty for a common or training field)."""
        return tuple(a for a in self.architectures if field in self.owned[a])

    def config_of(self, field: str) -> Optional[str]:
        """Which config a field belongs to: ``"sae"`` (a common SAE field, an architecture's,
        or ``expansion_factor``), ``"training"``, or None when it is neither."""
        if field == EXPANSION_FACTOR or field in self.sae_fields:
            return "sae"
        if field in self.training_fields:
            return "training"
        return None


def field_catalog() -> FieldCatalog:
    """What the trainer says about its architectures, fields and metrics (module docstring)."""
    names = tuple(registry.architecture_names())
    declared = evaluator_registry.declared_fields()
    extra = evaluator_registry.extra_metric_names()
    return FieldCatalog(
        architectures=names,
        default_architecture=registry.default_architecture(),
        owned={a: registry.architecture_fields(a) for a in names},
        searchable={a: registry.searchable_fields(a) for a in names},
        width_capped={a: registry.width_capped_fields(a) for a in names},
        transcoders=tuple(a for a in names if registry.options_class(a).transcodes),
        common_sae_fields=common_field_names(),
        data_fields=SAEConfig.DATA_FIELDS,
        training_fields=tuple(f.name for f in dataclasses.fields(TrainingConfig)),
        metrics=numeric_fields() + extra,
        objective_metrics=evaluator_registry.objective_metric_names(),
        bookkeeping_metrics=bookkeeping_metric_names(),
        evaluation_metrics=evaluation_metric_names() + extra,
        end_to_end_metrics=end_to_end_metric_names(),
        evaluators=tuple(evaluator_registry.evaluator_names()),
        metric_evaluator={f: evaluator_registry.field_evaluator(f) for f in declared},
        metric_better={f: m.better for f, m in declared.items()},
        metric_descriptions={f: m.description for f, m in declared.items()},
        default_evaluators=evaluator_registry.resolve_evaluators(TrainingConfig()),
        final_only_metrics=evaluator_registry.final_only_metric_names(),
        plugin_metrics=extra,
        headline_metrics=tuple(m for m in evaluator_registry.headline_metric_names()
                               if m in extra),
    )
