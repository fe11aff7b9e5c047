"""`sae-sweep best`: rank a sweep's trials, or compute its Pareto front, from results.parquet.

Everything here works on the results table alone (pandas), so it runs while the sweep is still
going and on machines without Ray. Defaults come from the sweep's stored config: the objective's
metric and mode, and its constraints (e.g. ``l0 <= 64``) as a filter, so ``best`` answers the
question the sweep was asked. Only trials with a finite value of the ranked metric(s) and status
``completed`` or ``stopped`` (early-stopped trials carry genuine, shorter-trained metrics) count.

Held-out roles: trials are ranked (and ``--where`` / the constraints filter) on the validation
figures (``fvu``, ``l0``...: what the sweep selected on); the ``test_*`` columns shown next to
them are the shipped SAE's figures on the test split, which nothing was tuned on -- the ones to
report.
"""

from __future__ import annotations

import json
import math
import tokenize
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from activation_cache import UserError

from .results import FIXED_COLUMNS, load_results, load_sweep_info
from .sweep_config import ConstraintSpec, searchable_names

OUTPUT_FORMATS = ("table", "csv", "json")
RANKED_STATUSES = ("completed", "stopped")
_SHOWN_METRICS = ("test_fvu", "test_l0", "test_explained_variance", "test_dead_fraction",
                  "test_ce_loss_delta", "test_kl_div", "test_ce_loss_score",
                  "fvu", "explained_variance", "l0", "dead_fraction", "ce_loss_delta", "kl_div",
                  "ce_loss_score")


class QueryError(UserError, ValueError):
    """A bad ``--where`` expression, an unknown column or metric, or a bad option."""


def print_best(
    experiment_dir: str | Path,
    *,
    metric: Optional[str] = None,
    mode: Optional[str] = None,
    where: Optional[str] = None,
    top: int = 5,
    pareto: bool = False,
    output_format: str = "table",
) -> pd.DataFrame:
    """Print the ``top`` best trials (or the Pareto front) and return them as a DataFrame."""
    if output_format not in OUTPUT_FORMATS:
        raise QueryError(f"format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    frame = load_results(experiment_dir)
    objective = load_sweep_info(experiment_dir).get("config", {}).get("objective", {})
    chosen = select_best(frame, objective=objective, metric=metric, mode=mode, where=where,
                         top=top, pareto=pareto)
    print(format_table(chosen, output_format))
    if output_format == "table" and not chosen.empty:
        ranked = metric or (_as_list(objective.get("metric")) or ["fvu"])[0]
        has_test = any(c.startswith("test_") for c in chosen.columns)
        print(f"(ranked on validation {ranked}; " + ("test_* columns: the held-out test split, "
                                                    "the figures to report)" if has_test else
                                                    "no test_* figures: the cache has no test "
                                                    "split)"))
    return chosen


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
    """The ranking behind :func:`print_best` (``objective`` is the sweep's objective dict)."""
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
        mode = obj_modes[obj_metrics.index(metric)] if metric in obj_metrics else "min"

    candidates = frame[frame["status"].isin(RANKED_STATUSES)] if "status" in frame else frame
    if candidates.empty:  # nothing finished yet: there are no metric columns to query
        return candidates[[c for c in ("trial_id", "status") if c in candidates.columns]]
    for constraint in objective.get("constraints") or []:
        candidates = apply_where(candidates, ConstraintSpec.from_dict(constraint).as_query())
    if where:
        candidates = apply_where(candidates, where)

    if pareto:
        if len(obj_metrics) > 1 and metric == obj_metrics[0]:
            metrics, modes = obj_metrics, obj_modes
        else:  # single objective: the classic sparsity / fidelity trade-off
            partner = "fvu" if metric == "l0" else "l0"  # l0 against itself is no trade-off
            metrics, modes = [metric, partner], [mode, "min"]
        _require_columns(candidates, metrics)
        front = pareto_front(candidates, metrics, modes)
        shown = front.sort_values(metrics[0], ascending=modes[0] == "min", kind="stable")
        return _display_columns(shown, metrics)

    _require_columns(candidates, [metric])
    ranked = candidates[candidates[metric].map(_is_finite)]
    ranked = ranked.sort_values(metric, ascending=mode == "min", kind="stable").head(top)
    return _display_columns(ranked, [metric])


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


def format_table(frame: pd.DataFrame, output_format: str) -> str:
    if output_format == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if output_format == "json":
        records = json.loads(frame.to_json(orient="records"))
        return json.dumps(records, indent=2)
    if frame.empty:
        return "(no trial matches)"
    # the console table leaves out the long checkpoint paths (csv/json keep them)
    shown = frame.drop(columns=[c for c in ("checkpoint_path",) if c in frame.columns])
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")


# -- helpers ---------------------------------------------------------------------------------


def _display_columns(frame: pd.DataFrame, ranked: Sequence[str]) -> pd.DataFrame:
    """Ranked metrics first, then the usual metrics, the hyperparameters and the bookkeeping."""
    first = ["trial_id", "status", *ranked]
    metrics = [c for c in _SHOWN_METRICS if c in frame.columns and c not in first]
    metrics = [c for c in metrics if frame[c].notna().any()]
    tail = ["tokens_seen", "train_seconds", "checkpoint_path"]
    params = [c for c in _param_columns(frame) if c not in first + metrics]
    columns = [c for c in first + metrics + params + tail if c in frame.columns]
    return frame[columns].reset_index(drop=True)


def _param_columns(frame: pd.DataFrame) -> list[str]:
    """The hyperparameter columns: those named after a searchable SAE/training field."""
    names = searchable_names()
    return [c for c in frame.columns if c in names and c not in FIXED_COLUMNS]


def _require_columns(frame: pd.DataFrame, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise QueryError(f"unknown metric(s) {', '.join(missing)}; columns are: "
                         f"{', '.join(map(str, frame.columns))}")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _is_finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
