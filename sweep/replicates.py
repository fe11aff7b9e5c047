"""Replicates: one configuration trained with several seeds, and ranking on their means.

A **replicate** re-trains another trial's configuration (all its hyperparameters) with another
``training.seed``, which seeds both the SAE's initial weights and the order of its training
data. The confirm stage (:mod:`sweep.confirm`) runs them. In the results table a replicate's
``replicate_of`` column names the trial it replicates and ``seed`` holds its seed (both null for
a search trial, which trained with the sweep's seed). A **configuration** is an original trial
with its replicates -- the original counts as one run -- named by the original's trial id.

**Aggregation** (:func:`aggregate_configurations`): per configuration, over its *completed*
runs: ``n`` and, for every metric column m, ``m_mean``, ``m_sd`` (the sample sd, ddof 1; null
for a single run) and ``m_n`` (the runs with a finite value). The metric columns are found, not
listed (:func:`metric_columns`): every numeric column that is neither a fixed or tail column of
the table nor a hyperparameter nor a label, so metrics other modules add (probe accuracies,
feature recovery, timings) are aggregated too.

**Ranking** (:func:`rank_configurations`): configurations whose *means* meet the sweep's
constraints first, then by the mean of the ranked metric (validation: what the sweep selects
on). A configuration without a finite mean of the ranked metric is not ranked.

**Within noise of the best** (:func:`noise_threshold`, :func:`pooled_sd`): the seed noise of a
metric is its **pooled** seed sd over the configurations with at least two runs,
``s = sqrt(sum_c (n_c - 1) s_c^2 / sum_c (n_c - 1))`` -- the sd of two or three seeds of one
configuration is itself too noisy to trust, and a configuration run once has none. A
configuration c meeting the constraints is *within noise* of the best b when
``|mean_c - mean_b| <= 2 s sqrt(1/n_c + 1/n_b)``: the two means differ by at most two standard
errors of their difference. Without any configuration of two runs there is no noise estimate
and nothing is flagged.

**Export** (:func:`export_choice`): the best configuration (as ranked above); of its completed
runs, the one best on the ranked *validation* metric (runs meeting the constraints first).
Choosing a seed on validation is selection like any other; no test figure takes part.

This module is pure pandas (no Ray): ``best``, ``export`` and the closing summary use it.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd

from .console import fmt_value
from .results import FIXED_COLUMNS, TAIL_COLUMNS
from .sweep_config import ConstraintSpec

REPLICATE_OF = "replicate_of"
"""Results column: the trial id a replicate re-trains (null for a search trial)."""
SEED = "seed"
"""Results column: a replicate's ``training.seed`` (null for a search trial)."""
LABELS = (REPLICATE_OF,)
"""Keys of a trial's config that label it rather than configure it (the trainable skips
them)."""
CONFIGURATION = "configuration"
"""Column of the aggregated table: the original trial's id."""
NOISE_FACTOR = 2.0
"""Standard errors of a difference of means within which two configurations tie."""


def has_replicates(frame: pd.DataFrame) -> bool:
    """Whether the results table holds any replicate (completed or not)."""
    return REPLICATE_OF in frame.columns and bool(frame[REPLICATE_OF].notna().any())


def configuration_of(frame: pd.DataFrame) -> pd.Series:
    """Per row, the configuration it belongs to: ``replicate_of``, else its own trial id."""
    ids = frame["trial_id"].astype(str)
    if REPLICATE_OF not in frame.columns:
        return ids
    origin = frame[REPLICATE_OF]
    return origin.where(origin.notna(), ids).astype(str)


def metric_columns(frame: pd.DataFrame, params: Sequence[str]) -> list[str]:
    """The numeric columns that are metrics: not a fixed/tail column, a hyperparameter
    (``params``) or a label."""
    skip = set(FIXED_COLUMNS) | set(TAIL_COLUMNS) | set(params) | {REPLICATE_OF, SEED,
                                                                   "feasible"}
    return [c for c in frame.columns if c not in skip
            and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]


def aggregate_configurations(frame: pd.DataFrame, *, params: Sequence[str],
                             metrics: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per configuration with a completed run (see the module docstring): the
    configuration's id, ``n``, ``trial_ids`` (comma-separated, the original first), its
    hyperparameters (``params``, from the original's row) and ``m_mean``/``m_sd``/``m_n`` of
    every metric (default: :func:`metric_columns`)."""
    done = frame[frame["status"] == "completed"] if "status" in frame.columns else frame
    params = [p for p in params if p in frame.columns]
    metrics = list(metrics) if metrics is not None else metric_columns(frame, params)
    columns = [CONFIGURATION, "n", "trial_ids", *params,
               *(f"{m}_{s}" for m in metrics for s in ("mean", "sd", "n"))]
    if done.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for cid, runs in done.groupby(configuration_of(done), sort=False):
        originals = runs[runs["trial_id"].astype(str) == cid]
        runs = pd.concat([originals, runs.drop(originals.index)])  # the original first
        first = runs.iloc[0]
        row: dict[str, Any] = {CONFIGURATION: cid, "n": len(runs),
                               "trial_ids": ",".join(runs["trial_id"].astype(str))}
        row.update({p: first[p] for p in params})
        for m in metrics:
            mean, sd, n = mean_sd_n(runs[m] if m in runs else [])
            row.update({f"{m}_mean": mean, f"{m}_sd": sd, f"{m}_n": n})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def mean_sd_n(values: Any) -> tuple[float, float, int]:
    """Mean, sample sd (ddof 1; NaN for fewer than two) and count of the finite values."""
    finite = np.array([float(v) for v in values if _is_finite(v)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan, 0
    sd = float(np.std(finite, ddof=1)) if finite.size >= 2 else math.nan
    return float(np.mean(finite)), sd, int(finite.size)


def pooled_sd(aggregated: pd.DataFrame, metric: str) -> Optional[float]:
    """The pooled seed sd of ``metric`` over the configurations with at least two finite runs
    (None when there is none)."""
    if f"{metric}_sd" not in aggregated.columns or aggregated.empty:
        return None
    n = aggregated[f"{metric}_n"].astype(float)
    sd = aggregated[f"{metric}_sd"].astype(float)
    ok = (n >= 2) & sd.notna()
    dof = float((n[ok] - 1).sum())
    if dof <= 0:
        return None
    return math.sqrt(float(((n[ok] - 1) * sd[ok] ** 2).sum()) / dof)


def noise_threshold(sd: float, n_a: int, n_b: int, factor: float = NOISE_FACTOR) -> float:
    """How far apart two means of ``n_a`` and ``n_b`` runs may be and still tie:
    ``factor * sd * sqrt(1/n_a + 1/n_b)``."""
    return factor * sd * math.sqrt(1.0 / n_a + 1.0 / n_b)


def rank_configurations(aggregated: pd.DataFrame, metric: str, mode: str,
                        constraints: Sequence[ConstraintSpec] = ()) -> pd.DataFrame:
    """The configurations with a finite mean of ``metric``, best first (constraints met on
    the means first), with ``feasible`` (when there are constraints), ``within_noise``
    (True/False; None where not judged) and ``noise_threshold`` (see the module docstring)."""
    key = f"{metric}_mean"
    if aggregated.empty or key not in aggregated.columns:
        return aggregated.iloc[0:0].assign(within_noise=None, noise_threshold=None)
    ranked = aggregated[aggregated[key].map(_is_finite)].copy()
    if constraints:
        ranked["feasible"] = [all(c.violation(_float(row.get(f"{c.metric}_mean"))) <= 0
                                  for c in constraints) for row in ranked.to_dict("records")]
    bad = ~ranked["feasible"].astype(bool) if constraints else pd.Series(False, index=ranked.index)
    value = ranked[key].astype(float) * (1.0 if mode == "min" else -1.0)
    order = pd.DataFrame({"bad": bad, "value": value}).sort_values(["bad", "value"], kind="stable")
    ranked = ranked.loc[order.index].reset_index(drop=True)
    ranked["within_noise"] = None
    ranked["noise_threshold"] = math.nan
    sd = pooled_sd(ranked, metric)
    if ranked.empty or sd is None:
        return ranked
    best = ranked.iloc[0]
    if constraints and not bool(best["feasible"]):
        return ranked  # nothing meets the constraints: no best to be near
    for i, row in ranked.iterrows():
        if constraints and not bool(row["feasible"]):
            continue
        threshold = noise_threshold(sd, int(row[f"{metric}_n"]), int(best[f"{metric}_n"]))
        ranked.at[i, "noise_threshold"] = threshold
        ranked.at[i, "within_noise"] = bool(abs(float(row[key]) - float(best[key])) <= threshold)
    return ranked


@dataclass
class ExportChoice:
    """What ``export --trial best`` ships when the sweep has replicates."""

    trial_id: Optional[str]
    """The run to export (None: no configuration qualifies)."""
    configuration: Optional[str]
    reason: str
    """One sentence: which configuration, which seed, and why."""


def export_choice(frame: pd.DataFrame, *, metric: str, mode: str,
                  constraints: Sequence[ConstraintSpec] = (),
                  params: Sequence[str] = ()) -> Optional[ExportChoice]:
    """The run ``export --trial best`` ships (see the module docstring); None when the table
    has no replicates (then the best single trial is the answer)."""
    if not has_replicates(frame):
        return None
    ranked = rank_configurations(aggregate_configurations(frame, params=params,
                                                          metrics=_needed(metric, constraints)),
                                 metric, mode, constraints)
    if constraints and len(ranked):
        ranked = ranked[ranked["feasible"].astype(bool)]
    if ranked.empty:
        return ExportChoice(None, None, "no configuration's mean meets the constraints"
                            if constraints else f"no configuration has a finite {metric}")
    best = ranked.iloc[0]
    cid = str(best[CONFIGURATION])
    runs = frame[(configuration_of(frame) == cid) & (frame["status"] == "completed")]
    runs = runs[runs[metric].map(_is_finite)]
    feasible = pd.Series([all(c.violation(_float(row.get(c.metric))) <= 0 for c in constraints)
                          for row in runs.to_dict("records")], index=runs.index, dtype=bool)
    value = runs[metric].astype(float) * (1.0 if mode == "min" else -1.0)
    order = pd.DataFrame({"bad": ~feasible, "value": value}).sort_values(["bad", "value"],
                                                                        kind="stable")
    chosen = runs.loc[order.index[0]]
    seed = chosen.get(SEED) if _is_finite(chosen.get(SEED)) else None
    n = int(best["n"])
    reason = (f"configuration {cid} has the best mean validation {metric} over {n} run(s) "
              f"({mean_pm_sd(best[f'{metric}_mean'], best[f'{metric}_sd'])}); exported its run "
              f"best on validation {metric} ({fmt_value(float(chosen[metric]))}): trial "
              f"{chosen['trial_id']}, "
              + (f"seed {int(seed)}" if seed is not None else "the search trial's seed"))
    return ExportChoice(str(chosen["trial_id"]), cid, reason)


def mean_pm_sd(mean: Any, sd: Any) -> str:
    """``0.3121 ± 0.0041`` (just the mean when there is no sd; ``-`` for no value)."""
    if not _is_finite(mean):
        return "-"
    text = fmt_value(float(mean))
    return text + (f" ± {float(sd):.2g}" if _is_finite(sd) else "")


# -- the table ``best`` prints --------------------------------------------------------------------


def format_configurations(ranked: pd.DataFrame, *, metric: str, mode: str,
                          constraints: Sequence[ConstraintSpec], params: Sequence[str],
                          runs: int, replicates: int, top: int,
                          render: Callable[..., tuple[str, list[str]]],
                          marks: tuple[str, str] = ("yes", "no"), width: Optional[int] = 120,
                          preferred: Sequence[str] = (), leading: Sequence[str] = ()) -> str:
    """The per-configuration table: ``mean ± sd`` of the ranked and constraint metrics (and
    their test figures), ``n``, the within-noise flag, the hyperparameters and the other
    metrics as far as they fit, ``preferred`` ones first (``render``: best's column-fitting
    table renderer); ``leading``: metrics shown with the ranked ones (the evaluators'
    headline fields)."""
    label = f"{metric} (test split)" if metric.startswith("test_") else f"validation {metric}"
    first = (", meeting " + " and ".join(c.as_query().replace("`", "") for c in constraints)
             + " on the mean first") if constraints else ""
    lines = [f"{min(top, len(ranked))} of {len(ranked)} configurations ({runs} completed runs, "
             f"{replicates} of them replicates), ranked on the mean {label} ({mode}) over "
             f"seeds{first}:"]
    if ranked.empty:
        return lines[0].rstrip(":") + ": none"
    shown = ranked.head(top)
    base = metric[len("test_"):] if metric.startswith("test_") else metric
    bound = [c.metric for c in constraints]
    shown_first = [m for m in leading if f"{m}_mean" in ranked.columns]  # evaluators' headlines
    headline = list(dict.fromkeys([metric, *bound, *shown_first, f"test_{base}",
                                   *(f"test_{m}" for m in bound)]))
    others = [c[:-len("_mean")] for c in ranked.columns if c.endswith("_mean")]
    first = [m for m in (*preferred, *(f"test_{m}" for m in preferred)) if m in others]
    others = first + [m for m in others if m not in first]
    table = pd.DataFrame({CONFIGURATION: shown[CONFIGURATION], "n": shown["n"]})
    for p in ("architecture", "hook"):
        if p in shown.columns:
            table[p] = shown[p]
    if constraints:
        table["feasible"] = shown["feasible"]
    table["near_best"] = ["best" if i == 0 and v is not None else "-" if v is None
                          else "yes" if v else "no"
                          for i, v in enumerate(shown["within_noise"])]
    for m in [*headline, *(p for p in params if p not in ("architecture", "hook")),
              *(m for m in others if m not in headline)]:
        if f"{m}_mean" in shown.columns:
            if shown[f"{m}_n"].fillna(0).astype(int).sum() == 0:
                continue
            table[m] = [mean_pm_sd(a, b) for a, b in zip(shown[f"{m}_mean"], shown[f"{m}_sd"])]
        elif m in shown.columns and m not in table.columns:
            table[m] = shown[m]
    text, left_out = render(table, marks=marks, width=width)
    lines.append(text)
    sd = pooled_sd(ranked, metric)
    legend = ["mean ± sd over a configuration's n completed runs (its search trial and its "
              "replicates; sample sd)"]
    if sd is None:
        legend.append("no configuration has two runs: no seed noise to judge near_best by")
    else:
        legend.append(f"near_best: within noise of the best, |mean - best mean| <= "
                      f"{NOISE_FACTOR:g} s sqrt(1/n + 1/n_best) with s = {sd:.3g}, the pooled "
                      f"seed sd of {metric}")
    if constraints:
        legend.append("ok: the means meet the constraints")
    if left_out:
        legend.append(f"{len(left_out)} more column(s): --all-columns")
    legend.append("each trial: --per-trial")
    text = "; ".join(legend)
    lines.append(text if width is None else textwrap.fill(text, width, break_on_hyphens=False,
                                                          subsequent_indent="  "))
    return "\n".join(lines)


def _needed(metric: str, constraints: Sequence[ConstraintSpec]) -> list[str]:
    return list(dict.fromkeys([metric, *(c.metric for c in constraints)]))


def _float(value: Any) -> Optional[float]:
    try:
        return None if value is None or pd.isna(value) else float(value)
    except (TypeError, ValueError):
        return None


def _is_finite(value: Any) -> bool:
    v = _float(value)
    return v is not None and math.isfinite(v)
