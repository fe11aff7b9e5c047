"""`sae-sweep best`: a sweep's trials from results.parquet -- ranked, Pareto, per architecture.

Everything here works on the results table alone (pandas), so it runs while the sweep is still
going and on machines without Ray. Defaults come from the sweep's stored config: the objective's
metric and mode, and its constraints (e.g. ``l0 <= 64``).

What ``best`` shows (:func:`print_best`), and what it does not hide:

* ``--where`` filters the whole table, whatever the trials' status; nothing else filters.
* **Ranked**: ``completed`` trials with a finite value of the ranked metric -- those that meet
  the sweep's constraints first, then the others, each group by the metric. The constraints are
  shown, never applied silently: a column ``ok`` (✓/✗ on a UTF-8 terminal, yes/no otherwise;
  ``feasible`` true/false in CSV and JSON).
* **Not ranked**: ``stopped`` (ended early by ASHA or the time budget) and ``interrupted``
  (Ctrl-C, or a killed driver) trials trained less than their budget; they are shown apart,
  after the ranking, never among it.
* ``failed``, ``running``, ``pending`` and ``paused`` trials are counted in one line.
* An empty selection is one line (``no trial matches ...``).
* Tables fit :data:`TABLE_WIDTH` characters: the trial id, architecture, ``ok``, the ranked
  metric, the constraint metrics and their test figures, then the searched hyperparameters and
  other metrics as far as they fit; ``all_columns`` shows every column. CSV and JSON hold the
  ranked rows, then the unranked ones, with every display column.
* ``per_architecture``: per architecture, how many trials ran, how many met the constraints and
  the best of each (:func:`architecture_summary`; the sweep's closing summary shows it too).

Held-out roles: trials are ranked on the validation figures (``fvu``, ``l0``...: what the sweep
selected on); the ``test_*`` columns are the shipped SAE's figures on the test split, which
nothing was tuned on -- the ones to report. Ranking on a ``test_*`` metric is allowed, labelled
as such, with a warning.

:func:`select_best` is the sweep's answer for other commands (``export --trial best``, the
report's highlighted trial, the closing summary): the ranked trials that meet the constraints.
:data:`SHOWN_STATUSES` are the trials with metrics, which ``best`` lists and ``report`` plots.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional, Sequence

import pandas as pd

from activation_cache import UserError

from .console import fmt_value
from .replicates import _float, _is_finite  # noqa: F401 -- the one definition of both
from .replicates import (REPLICATE_OF, SEED, aggregate_configurations, format_configurations,
                         has_replicates, rank_configurations)
from .results import FIXED_COLUMNS, TAIL_COLUMNS, load_results, load_sweep_info
from .sweep_config import ConstraintSpec

logger = logging.getLogger("sweep.best")

OUTPUT_FORMATS = ("table", "csv", "json")
RANKED_STATUSES = ("completed",)
UNRANKED_STATUSES = ("stopped", "interrupted")
SHOWN_STATUSES = RANKED_STATUSES + UNRANKED_STATUSES
"""Trials with metrics: what ``best`` lists and ``report`` plots."""
TABLE_WIDTH = 120
_OTHER_METRICS = ("fvu", "l0", "explained_variance", "dead_fraction", "ce_loss_delta", "kl_div",
                  "ce_loss_score")
"""Metrics shown after the ranked ones, then every other evaluator's fields
(``plugin_metrics()``) where the table has them."""


def plugin_metrics() -> tuple[str, ...]:
    """The numeric fields of evaluators beyond reconstruction and end-to-end
    (``feature_mcc``, probing...): the trainer's catalog, not a list of ours."""
    from .sweep_config import catalog

    return tuple(catalog().plugin_metrics)


def headline_metrics() -> tuple[str, ...]:
    """Each evaluator's headline field among :func:`plugin_metrics` (shown by default)."""
    from .sweep_config import catalog

    return tuple(catalog().headline_metrics)


def default_mode(metric: str) -> str:
    """``min`` or ``max`` for a metric no objective names: the direction its evaluator declares
    (``test_<m>`` as ``m``), else ``min``."""
    from .sweep_config import catalog

    base = metric[len("test_"):] if metric.startswith("test_") else metric
    return "max" if catalog().metric_better.get(base) == "higher" else "min"


class QueryError(UserError, ValueError):
    """A bad ``--where`` expression, an unknown column or metric, or a bad option."""


@dataclass
class Selection:
    """What ``best`` found (see the module docstring)."""

    ranked: pd.DataFrame
    """Completed trials, meeting the constraints first, best first (at most ``top``; the Pareto
    front with ``pareto``)."""
    unranked: pd.DataFrame
    """Stopped and interrupted trials (at most ``top``), by the metric; never ranked."""
    metrics: list[str]
    """The ranked metric (two for a Pareto front)."""
    modes: list[str]
    constraints: list[ConstraintSpec]
    counts: dict[str, int]
    """Trials matching ``where`` per status."""
    total: int
    """Trials in the table."""
    where: Optional[str] = None
    pareto: bool = False
    more_ranked: int = 0
    """Ranked trials left out by ``top``."""
    more_unranked: int = 0
    searched: list[str] = field(default_factory=list)
    others: Optional[pd.DataFrame] = None
    """With ``where``: the matching failed, running, pending or paused trials (at most
    ``top``), listed after the others."""
    total_counts: dict[str, int] = field(default_factory=dict)
    """Trials in the table per status."""

    @property
    def empty(self) -> bool:
        return self.ranked.empty and self.unranked.empty and (
            self.others is None or self.others.empty)

    @property
    def shown(self) -> pd.DataFrame:
        """The ranked rows, then the unranked ones (then, with ``where``, the others)."""
        parts = [f for f in (self.ranked, self.unranked, self.others)
                 if f is not None and len(f)]
        if not parts:
            return self.ranked
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def print_best(
    experiment_dir: str | Path,
    *,
    metric: Optional[str] = None,
    mode: Optional[str] = None,
    where: Optional[str] = None,
    top: int = 5,
    pareto: bool = False,
    output_format: str = "table",
    all_columns: bool = False,
    per_architecture: bool = False,
    per_trial: bool = False,
    stream: Optional[IO[str]] = None,
) -> pd.DataFrame:
    """Print the trials ``best`` selects (or the Pareto front, or the per-architecture view)
    and return the rows shown (ranked first). When the sweep has replicates (its confirm
    stage) the ranking is per configuration, on seed means (:mod:`sweep.replicates`), unless
    ``per_trial``."""
    if output_format not in OUTPUT_FORMATS:
        raise QueryError(f"format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    out = stream or sys.stdout
    frame = load_results(experiment_dir)
    config = load_sweep_info(experiment_dir).get("config", {})
    objective = config.get("objective", {})
    if has_replicates(frame) and not (pareto or per_architecture or per_trial):
        return print_configurations(frame, config, metric=metric, mode=mode, where=where,
                                    top=top, output_format=output_format,
                                    all_columns=all_columns, stream=out)
    selection = select_trials(frame, objective=objective, metric=metric, mode=mode, where=where,
                              top=top, pareto=pareto, searched=list(config.get("search_space") or []))
    if selection.metrics[0].startswith("test_"):
        logger.warning("ranking on %s, the held-out test split: test figures are for reporting; "
                       "select on a validation metric (--metric %s)", selection.metrics[0],
                       selection.metrics[0][len("test_"):])
    if per_architecture:
        matched = apply_where(frame, where) if where else frame
        lines = architecture_lines(architecture_summary(
            matched, objective=objective, metric=selection.metrics[0], mode=selection.modes[0],
            default_architecture=(config.get("sae") or {}).get("architecture")), selection)
        print("\n".join(lines) if lines else empty_line(selection), file=out)
        return selection.shown
    if selection.empty:
        print(empty_line(selection), file=out if output_format == "table" else sys.stderr)
        if output_format == "json":
            print("[]", file=out)
        return selection.shown
    if output_format == "table":
        print(format_selection(selection, all_columns=all_columns, marks=marks_for(out)), file=out)
    else:
        print(format_table(_machine_columns(selection, frame, all_columns), output_format),
              file=out, end="")
    return selection.shown


def print_configurations(frame: pd.DataFrame, config: dict[str, Any], *,
                         metric: Optional[str] = None, mode: Optional[str] = None,
                         where: Optional[str] = None, top: int = 5, output_format: str = "table",
                         all_columns: bool = False, stream: Optional[IO[str]] = None
                         ) -> pd.DataFrame:
    """``best`` of a sweep with replicates: configurations ranked on seed means, with
    ``mean ± sd``, ``n`` and the within-noise flag (see :mod:`sweep.replicates`); returns the
    aggregated rows shown."""
    out = stream or sys.stdout
    selection = select_trials(frame, objective=config.get("objective", {}), metric=metric,
                              mode=mode, where=where, top=top)  # checks the options
    matched = apply_where(frame, where) if where else frame
    params = configuration_columns(matched, list(config.get("search_space") or []))
    ranked = rank_configurations(aggregate_configurations(matched, params=params),
                                 selection.metrics[0], selection.modes[0], selection.constraints)
    if output_format != "table":
        shown = ranked.head(top)
        print(format_table(shown, output_format), file=out, end="")
        return shown
    done = matched[matched["status"] == "completed"] if "status" in matched else matched
    replicates = int(done[REPLICATE_OF].notna().sum()) if REPLICATE_OF in done else 0
    print(format_configurations(
        ranked, metric=selection.metrics[0], mode=selection.modes[0],
        constraints=selection.constraints, params=params, runs=len(done),
        replicates=replicates, top=top, render=render_table, marks=marks_for(out),
        width=None if all_columns else TABLE_WIDTH,
        preferred=_OTHER_METRICS, leading=headline_metrics()), file=out)
    return ranked.head(top)


def configuration_columns(frame: pd.DataFrame, searched: Sequence[str]) -> list[str]:
    """The columns that configure a trial (what its replicates share): the searched
    hyperparameters (with ``d_sae`` for ``expansion_factor``), the architecture and hook
    columns and any column named after a searchable field."""
    from .sweep_config import searchable_names

    names = set(searched) | set(searchable_names()) | {"architecture", "hook", "d_sae"}
    return [c for c in frame.columns if c in names and c not in FIXED_COLUMNS
            and c != SEED]


def select_trials(
    frame: pd.DataFrame,
    *,
    objective: Optional[dict[str, Any]] = None,
    metric: Optional[str] = None,
    mode: Optional[str] = None,
    where: Optional[str] = None,
    top: int = 5,
    pareto: bool = False,
    searched: Sequence[str] = (),
) -> Selection:
    """The selection behind :func:`print_best` (``objective``: the sweep's objective dict;
    ``searched``: the searched hyperparameters, shown before the other columns)."""
    objective = objective or {}
    obj_metrics = _as_list(objective.get("metric")) or ["fvu"]
    obj_modes = _as_list(objective.get("mode")) or ["min"]
    if top < 1:
        raise QueryError(f"--top must be >= 1, got {top}")
    if mode is not None and mode not in ("min", "max"):
        raise QueryError(f"--mode must be min or max, got {mode!r}")
    if metric is None:
        metric = obj_metrics[0]
        mode = mode or obj_modes[0]
    elif mode is None:
        mode = (obj_modes[obj_metrics.index(metric)] if metric in obj_metrics
                else default_mode(metric))
    if pareto:
        if len(obj_metrics) > 1 and metric == obj_metrics[0]:
            metrics, modes = list(obj_metrics), list(obj_modes)
        else:  # single objective: the classic sparsity / fidelity trade-off
            partner = "fvu" if metric == "l0" else "l0"  # l0 against itself is no trade-off
            metrics, modes = [metric, partner], [mode, "min"]
    else:
        metrics, modes = [metric], [mode]
    constraints = [ConstraintSpec.from_dict(c) for c in objective.get("constraints") or []]

    if "status" not in frame:
        frame = frame.assign(status="completed")
    total_counts = {str(k): int(v) for k, v in frame["status"].value_counts().items()}
    matched = apply_where(frame, where) if where else frame
    status = matched["status"]
    counts = {str(k): int(v) for k, v in status.value_counts().items()}
    searched = [c for c in searched if c in frame.columns]
    rest = matched[~status.isin(SHOWN_STATUSES)]
    others = None
    if where and len(rest):
        keep = _display_columns(rest, [m for m in metrics if m in rest], [], searched)
        others = rest.head(top)[keep + [c for c in ("error",) if c in rest and c not in keep]]
        others = others.reset_index(drop=True)
    if matched[status.isin(SHOWN_STATUSES)].empty:
        empty = matched.iloc[0:0]
        return Selection(empty, empty, metrics, modes, constraints, counts, len(frame), where,
                         pareto, others=others, total_counts=total_counts)
    _require_columns(matched, metrics)
    if constraints:
        matched = matched.assign(feasible=feasibility(matched, constraints))
    finite = matched[metrics].apply(lambda col: col.map(_is_finite)).all(axis=1)
    completed = matched[status.isin(RANKED_STATUSES) & finite]
    if pareto:
        ranked = pareto_front(completed, metrics, modes)
        ranked = ranked.sort_values(metrics[0], ascending=modes[0] == "min", kind="stable")
        more = 0
    else:
        ranked = _rank(completed, metrics[0], modes[0], constraints)
        more = max(0, len(ranked) - top)
        ranked = ranked.head(top)
    unranked = matched[status.isin(UNRANKED_STATUSES)]
    unranked = _rank(unranked, metrics[0], modes[0], constraints)
    more_unranked = max(0, len(unranked) - top)
    columns = _display_columns(matched, metrics, constraints, searched)
    return Selection(ranked[columns].reset_index(drop=True),
                     unranked.head(top)[columns].reset_index(drop=True), metrics, modes,
                     constraints, counts, len(frame), where, pareto, more, more_unranked,
                     searched, others, total_counts)


def select_best(
    frame: pd.DataFrame,
    *,
    objective: Optional[dict[str, Any]] = None,
    metric: Optional[str] = None,
    mode: Optional[str] = None,
    where: Optional[str] = None,
    top: int = 5,
    pareto: bool = False,
) -> pd.DataFrame:
    """The sweep's answer: completed trials that meet its constraints, best first (at most
    ``top``; what ``export --trial best`` and the report take as the best trial)."""
    selection = select_trials(frame, objective=objective, metric=metric, mode=mode, where=where,
                              top=top, pareto=pareto)
    ranked = selection.ranked
    if selection.constraints and "feasible" in ranked:
        ranked = ranked[ranked["feasible"].astype(bool)].reset_index(drop=True)
    return ranked


def feasibility(frame: pd.DataFrame, constraints: Sequence[ConstraintSpec]) -> pd.Series:
    """Per row: whether it meets every constraint (a missing value does not)."""
    ok = pd.Series(True, index=frame.index)
    for c in constraints:
        values = frame[c.metric] if c.metric in frame else pd.Series(None, index=frame.index)
        ok &= values.map(lambda v: c.violation(_float(v)) <= 0)
    return ok.astype(bool)


def apply_where(frame: pd.DataFrame, expression: str) -> pd.DataFrame:
    """``frame.query(expression)`` with a clear :class:`QueryError` for bad expressions."""
    try:
        result = frame.query(expression, engine="python")
    except pd.errors.UndefinedVariableError as exc:
        raise QueryError(f"--where {expression!r}: {exc}; columns are: "
                         f"{', '.join(map(str, frame.columns))}") from None
    except (SyntaxError, tokenize.TokenError, NotImplementedError, ValueError, TypeError,
            KeyError, AttributeError) as exc:
        raise QueryError(f"--where {expression!r} is not a valid pandas query: {exc}") from None
    if not isinstance(result, pd.DataFrame):
        raise QueryError(f"--where {expression!r} must be a condition such as \"l0 <= 64\"")
    return result


def pareto_front(frame: pd.DataFrame, metrics: Sequence[str], modes: Sequence[str]) -> pd.DataFrame:
    """Rows not dominated by any other row (rows with a missing/non-finite value are dropped).

    Row a dominates row b when a is at least as good in every metric and strictly better in one.
    Identical rows do not dominate each other, so ties all stay on the front."""
    if len(metrics) != len(modes) or not metrics:
        raise QueryError("pareto needs one mode per metric")
    ok = frame[frame[list(metrics)].apply(lambda col: col.map(_is_finite)).all(axis=1)]
    signs = [1.0 if m == "min" else -1.0 for m in modes]
    values = [[s * float(v) for s, v in zip(signs, row)] for row in ok[list(metrics)].to_numpy()]
    keep = []
    for i, a in enumerate(values):
        dominated = any(
            all(bj <= aj for aj, bj in zip(a, b)) and any(bj < aj for aj, bj in zip(a, b))
            for j, b in enumerate(values) if j != i)
        keep.append(not dominated)
    return ok[keep]


# -- text ------------------------------------------------------------------------------------


def metric_label(metric: str) -> str:
    """``validation fvu``, or ``test_fvu (test split)``."""
    return f"{metric} (test split)" if metric.startswith("test_") else f"validation {metric}"


def constraints_text(constraints: Sequence[ConstraintSpec]) -> str:
    """``l0 <= 48 and dead_fraction <= 0.5``."""
    parts = []
    for c in constraints:
        if c.min is not None:
            parts.append(f"{c.metric} >= {fmt_value(c.min)}")
        if c.max is not None:
            parts.append(f"{c.metric} <= {fmt_value(c.max)}")
    return " and ".join(parts)


def empty_line(selection: Selection) -> str:
    """The one line of an empty selection."""
    counts = counts_text(selection.total_counts)
    if selection.where:
        return (f'no trial matches --where "{selection.where}" ({selection.total} trial(s) in '
                "the table" + (f": {counts}" if counts else "") + ")")
    return "no trial has finished yet" + (f" ({counts})" if counts else " (the table is empty)")


def marks_for(stream: Optional[IO[str]]) -> tuple[str, str]:
    """The ``ok`` column's marks: ✓/✗ on a UTF-8 terminal, yes/no otherwise."""
    try:
        tty = bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        tty = False
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return ("✓", "✗") if tty and encoding in ("utf8", "utf_8") else ("yes", "no")


def format_selection(selection: Selection, *, all_columns: bool = False,
                     marks: tuple[str, str] = ("yes", "no"), width: int = TABLE_WIDTH) -> str:
    """The table ``best`` prints: the ranked trials, the unranked ones apart, the rest counted,
    and a legend; every line within ``width`` unless ``all_columns``."""
    lines = []
    metric = selection.metrics[0]
    hidden: set[str] = set()
    n_completed = selection.counts.get("completed", 0)
    if selection.where:
        n = sum(selection.counts.values())
        lines.append(f'{n} of {selection.total} trials match --where "{selection.where}"')
    if selection.pareto:
        what = " and ".join(f"{m} ({o})" for m, o in zip(selection.metrics, selection.modes))
        lines.append(f"Pareto front of {what}: {len(selection.ranked)} of {n_completed} "
                     "completed trials")
    elif len(selection.ranked):
        first = f", meeting {constraints_text(selection.constraints)} first" \
            if selection.constraints else ""
        lines.append(f"{len(selection.ranked)} of {n_completed} completed trials, ranked on "
                     f"{metric_label(metric)} ({selection.modes[0]}){first}:")
    else:
        lines.append(f"no completed trial with a finite {metric} to rank")
    if len(selection.ranked):
        table, left_out = render_table(selection.ranked.drop(columns=["status"], errors="ignore"),
                                       marks=marks, width=None if all_columns else width)
        lines.append(table)
        hidden |= set(left_out)
    if len(selection.unranked):
        n = sum(selection.counts.get(s, 0) for s in UNRANKED_STATUSES)
        lines.append(f"not ranked: {n} stopped or interrupted trial(s), which trained less than "
                     "their budget" + (f" ({selection.more_unranked} more: raise --top)"
                                       if selection.more_unranked else "") + ":")
        table, left_out = render_table(selection.unranked, marks=marks,
                                       width=None if all_columns else width)
        lines.append(table)
        hidden |= set(left_out)
    rest = {s: n for s, n in selection.counts.items() if s not in SHOWN_STATUSES}
    if selection.others is not None and len(selection.others):
        lines.append(f"other matching trials ({counts_text(rest)}):")
        brief = [c for c in dict.fromkeys(("trial_id", "status", "architecture",
                                           *selection.searched, "error"))
                 if c in selection.others]
        table, _ = render_table(_short_errors(selection.others[brief]), marks=marks,
                                width=None if all_columns else width)
        lines.append(table)
    elif rest:
        lines.append(f"also in the table: {counts_text(rest)} (--where \"status == "
                     f"'{sorted(rest)[0]}'\" lists them)")
    legend = []
    if selection.constraints:
        legend.append(f"ok: meets {constraints_text(selection.constraints)}")
    if any(c.startswith("test_") for c in selection.shown.columns):
        legend.append("test_*: the held-out test split, the figures to report")
    elif len(selection.ranked):
        legend.append("no test_* figures (the cache has no test split)")
    else:
        legend.append("no test_* figures yet (a trial adds them when it completes)")
    if hidden:
        legend.append(f"{len(hidden)} more column(s): --all-columns")
    lines.append("; ".join(legend))
    return "\n".join(wrap_line(line, width) if i and not all_columns and "\n" not in line else line
                     for i, line in enumerate(lines))


def render_table(frame: pd.DataFrame, *, marks: tuple[str, str] = ("yes", "no"),
                 width: Optional[int] = TABLE_WIDTH) -> tuple[str, list[str]]:
    """``frame`` as text, its columns in priority order: as many as fit ``width`` (all when
    None; the first two always). Returns the text and the columns left out."""
    shown = frame.drop(columns=[c for c in ("checkpoint_path",) if c in frame.columns])
    if "feasible" in shown:
        shown = shown.assign(feasible=shown["feasible"].map(
            lambda v: marks[0] if bool(v) else marks[1])).rename(columns={"feasible": "ok"})
    if width is None:
        return _to_text(shown), []
    columns = list(shown.columns)
    kept, left_out = columns[:2], []
    for name in columns[2:]:
        if max(map(len, _to_text(shown[kept + [name]]).splitlines())) <= width:
            kept.append(name)
        else:
            left_out.append(name)
    return _to_text(shown[kept]), left_out


def format_table(frame: pd.DataFrame, output_format: str) -> str:
    """``frame`` as CSV or JSON (ending with a newline), or as a plain table."""
    if output_format == "csv":
        return frame.to_csv(index=False)
    if output_format == "json":
        return json.dumps(json.loads(frame.to_json(orient="records")), indent=2) + "\n"
    if frame.empty:
        return "(no trial matches)"
    return render_table(frame, width=None)[0]


# -- per architecture --------------------------------------------------------------------------


@dataclass
class ArchitectureSummary:
    """One architecture's trials in a sweep (see :func:`architecture_summary`)."""

    architecture: Optional[str]
    trials: int
    """Trials that ran (every status but pending)."""
    completed: int
    met: Optional[int]
    """Completed trials meeting the constraints (None without constraints)."""
    best: Optional[dict[str, Any]]
    """The best completed trial (meeting the constraints when there are any)."""
    closest: Optional[dict[str, Any]]
    """When none met the constraints: the trial with metrics closest to meeting them."""


def architecture_summary(frame: pd.DataFrame, *, objective: Optional[dict[str, Any]] = None,
                         metric: Optional[str] = None, mode: Optional[str] = None,
                         default_architecture: Optional[str] = None) -> list[ArchitectureSummary]:
    """Per architecture (the ``architecture`` column, else ``default_architecture``): trials
    run, completed, meeting the constraints, the best, and the closest miss."""
    objective = objective or {}
    metric = metric or (_as_list(objective.get("metric")) or ["fvu"])[0]
    mode = mode or (_as_list(objective.get("mode")) or ["min"])[0]
    constraints = [ConstraintSpec.from_dict(c) for c in objective.get("constraints") or []]
    if frame.empty:
        return []
    if "architecture" in frame and frame["architecture"].notna().any():
        groups = [(str(a), g) for a, g in frame.groupby(frame["architecture"].fillna("?"),
                                                        sort=True)]
    else:
        groups = [(default_architecture, frame)]
    out = []
    for arch, rows in groups:
        status = rows["status"] if "status" in rows else pd.Series("completed", index=rows.index)
        ran = rows[status != "pending"]
        completed = rows[(status == "completed")]
        if metric in completed:
            completed = completed[completed[metric].map(_is_finite)]
        else:
            completed = completed.iloc[0:0]
        met = None
        best = closest = None
        if constraints:
            feasible = completed[feasibility(completed, constraints)] if len(completed) else completed
            met = len(feasible)
            pool = feasible
            if met == 0:
                with_metrics = rows[status.isin(SHOWN_STATUSES)]
                closest = _closest(with_metrics, constraints)
        else:
            pool = completed
        if len(pool):
            best = _rank(pool, metric, mode, []).iloc[0].to_dict()
        out.append(ArchitectureSummary(arch, len(ran), len(completed), met, best, closest))
    return out


def architecture_lines(summaries: Sequence[ArchitectureSummary], selection: Selection) -> list[str]:
    """One line per architecture: ``topk: 4 trials (4 completed), 3 met l0 <= 48; best ab12:
    val fvu 0.31, l0 34; test fvu 0.32, l0 35``."""
    lines = []
    shown = summary_metrics(selection.metrics[0], selection.constraints)
    for s in summaries:
        name = s.architecture or "all"
        text = f"{name}: {_trials(s.trials)}"
        if s.met is not None and s.met:
            text += f", {s.met} met {constraints_text(selection.constraints)}"
        elif s.met is None:
            text += f", {s.completed} completed"
        if s.met == 0:
            lines.append(never_met_line(s, selection.constraints))
            continue
        if s.best is not None:
            text += f"; best {s.best['trial_id']} {figures(s.best, shown)}"
        elif s.met is None:
            text += "; none completed"
        lines.append(text)
    return lines


def never_met_line(summary: ArchitectureSummary, constraints: Sequence[ConstraintSpec]) -> str:
    """``jumprelu: 3 trials, none met l0 <= 48 (closest l0 201)``."""
    name = f"{summary.architecture}: " if summary.architecture else "all "
    text = f"{name}{_trials(summary.trials)}, none met {constraints_text(constraints)}"
    if summary.closest is not None:
        values = ", ".join(f"{c.metric} {fmt_value(_float(summary.closest.get(c.metric)))}"
                           for c in constraints)
        text += f" (closest {values})"
    elif summary.trials:
        text += " (none finished)"
    return text


def never_met_warnings(frame: pd.DataFrame, objective: dict[str, Any], *,
                       default_architecture: Optional[str] = None) -> list[str]:
    """One line per architecture none of whose trials met the sweep's constraints."""
    constraints = [ConstraintSpec.from_dict(c) for c in objective.get("constraints") or []]
    if not constraints:
        return []
    return [never_met_line(s, constraints)
            for s in architecture_summary(frame, objective=objective,
                                          default_architecture=default_architecture)
            if s.met == 0 and s.trials]


def figures(row: dict[str, Any], metrics: Sequence[str]) -> str:
    """``val fvu 0.31, l0 34; test fvu 0.32, l0 35``: the shipped encoder's figures of a trial,
    labelled with their split (the test part only where the trial has test figures)."""
    val = [f"{m} {fmt_value(_float(row.get(m)))}" for m in metrics if _is_finite(row.get(m))]
    test = [f"{m} {fmt_value(_float(row.get('test_' + m)))}" for m in metrics
            if _is_finite(row.get("test_" + m))]
    parts = []
    if val:
        parts.append("val " + ", ".join(val))
    if test:
        parts.append("test " + ", ".join(test))
    return "; ".join(parts) or "no metrics"


def summary_metrics(metric: str, constraints: Sequence[ConstraintSpec]) -> list[str]:
    base = metric[len("test_"):] if metric.startswith("test_") else metric
    names = [base] + [c.metric for c in constraints]
    if len(names) == 1:
        names.append("l0" if base != "l0" else "fvu")
    return list(dict.fromkeys(names))[:3]


# -- helpers ---------------------------------------------------------------------------------


def _rank(frame: pd.DataFrame, metric: str, mode: str,
          constraints: Sequence[ConstraintSpec]) -> pd.DataFrame:
    """Rows meeting the constraints first, then by ``metric`` (missing values last)."""
    if frame.empty:
        return frame
    key = frame[metric].map(lambda v: _float(v) if _is_finite(v) else math.nan)
    order = pd.DataFrame({"bad": ~feasibility(frame, constraints) if constraints else False,
                          "value": key if mode == "min" else -key}, index=frame.index)
    order = order.sort_values(["bad", "value"], kind="stable", na_position="last")
    return frame.loc[order.index]


def _closest(frame: pd.DataFrame, constraints: Sequence[ConstraintSpec]) -> Optional[dict]:
    """The row whose worst relative violation of the constraints is smallest."""
    best, best_score = None, math.inf
    for row in frame.to_dict("records"):
        score = 0.0
        for c in constraints:
            bound = c.max if c.max is not None else c.min
            scale = max(abs(float(bound)), 1e-12) if bound is not None else 1.0
            score = max(score, max(0.0, c.violation(_float(row.get(c.metric)))) / scale)
        if any(_is_finite(row.get(c.metric)) for c in constraints) and score < best_score:
            best, best_score = row, score
    return best


def _display_columns(frame: pd.DataFrame, ranked: Sequence[str],
                     constraints: Sequence[ConstraintSpec], searched: Sequence[str]) -> list[str]:
    """The order in which ``best`` shows columns (as many as fit, in a table)."""
    has = [c for c in frame.columns if c in FIXED_COLUMNS or c in TAIL_COLUMNS
           or c == "feasible" or frame[c].notna().any()]
    bound = [c.metric for c in constraints]
    base = [m[len("test_"):] if m.startswith("test_") else m for m in ranked]
    params = [c for c in searched if c != "architecture"] or _param_columns(frame)
    order = ["trial_id", "status", "hook", "architecture", "feasible", *ranked, *bound,
             *headline_metrics(),
             *(f"test_{m}" for m in [*base, *bound]), *params,
             *(m for m in _OTHER_METRICS), *(f"test_{m}" for m in _OTHER_METRICS),
             *plugin_metrics(), *(f"test_{m}" for m in plugin_metrics()),
             "tokens_seen", "train_seconds", "checkpoint_path", *_time_columns(frame)]
    columns = []
    for c in order:
        if c in has and c not in columns:
            columns.append(c)
    return columns


def _time_columns(frame: pd.DataFrame) -> list[str]:
    """Where the trials' time went (``time_*_s``, trainer.timing), last: slot and wall time,
    the training phases, the evaluations, then the other phases by name."""
    first = ["time_slot_s", "time_wall_s", "time_train_s", "time_finetune_s", "time_eval_s"]
    rest = sorted(c for c in frame.columns
                  if c.startswith("time_") and c.endswith("_s") and c not in first)
    return [c for c in first if c in frame.columns] + rest


def _machine_columns(selection: Selection, frame: pd.DataFrame, all_columns: bool) -> pd.DataFrame:
    shown = selection.shown
    if not all_columns:
        return shown
    ids = list(shown["trial_id"])
    full = frame.set_index("trial_id").loc[ids].reset_index()
    if "feasible" in shown:
        full["feasible"] = list(shown["feasible"])
    first = [c for c in shown.columns if c in full.columns]
    return full[first + [c for c in full.columns if c not in first]]


def _param_columns(frame: pd.DataFrame) -> list[str]:
    """The hyperparameter columns of a table without a stored config: those named after a
    searchable SAE/training field."""
    from .sweep_config import searchable_names

    names = searchable_names()
    return [c for c in frame.columns if c in names and c not in FIXED_COLUMNS]


def _short_errors(frame: pd.DataFrame, limit: int = 60) -> pd.DataFrame:
    if "error" not in frame:
        return frame
    return frame.assign(error=frame["error"].map(
        lambda e: e if not isinstance(e, str) or len(e) <= limit else e[:limit - 3] + "..."))


def _to_text(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    for name in shown.columns:
        if shown[name].dtype == object or (shown[name].hasnans and pd.api.types.is_extension_array_dtype(
                shown[name].dtype)):  # None (object) and <NA> (Int64) escape na_rep
            shown[name] = shown[name].map(lambda v: "-" if _missing(v) else
                                          f"{v:.4g}" if isinstance(v, float) else v)
    return shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def wrap_line(line: str, width: int, indent: str = "  ") -> str:
    """A prose line folded at spaces to ``width`` (continuation lines after ``indent``)."""
    if len(line) <= width:
        return line
    import textwrap

    return "\n".join(textwrap.wrap(line, width, break_on_hyphens=False,
                                   subsequent_indent=indent))


def _trials(n: int) -> str:
    return f"{n} trial" + ("" if n == 1 else "s")


def counts_text(counts: dict[str, int]) -> str:
    order = ("completed", "stopped", "interrupted", "failed", "running", "paused", "pending")
    keys = [k for k in order if counts.get(k)] + sorted(k for k in counts if k not in order
                                                         and counts[k])
    return ", ".join(f"{counts[k]} {k}" for k in keys)


def _require_columns(frame: pd.DataFrame, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise QueryError(f"unknown metric(s) {', '.join(missing)}; columns are: "
                         f"{', '.join(map(str, frame.columns))}")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


