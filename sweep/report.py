"""`sae-sweep report`: PNG plots of a sweep, from its results tables (matplotlib, Agg backend).

* ``pareto_l0_fvu.png`` -- the L0 against fvu of every trial ``sae-sweep best`` lists
  (:func:`report_trials`: completed, and apart -- hollow -- stopped and interrupted ones), the
  Pareto front of the completed ones drawn as a staircase, the best trial (by the sweep's
  objective and constraints, as ``best`` and ``export --trial best`` choose it) highlighted;
* ``pareto_l0_ce_loss_delta.png`` -- the same against ce_loss_delta, when trials computed it;
* ``pareto_l0_<metric>.png`` -- the same against each evaluator's headline field the trials
  report (``feature_mcc``, probing...; the front in the direction its evaluator declares);
* ``training_curves.png`` -- fvu (and L0) against training tokens for the ``top`` best trials;
* ``winners_by_layer.png`` -- a suite (``hooks:``): each hook's winner's test fvu, l0 and
  ce_loss_delta (when measured) against its layer (:func:`sweep.suite_results.layer_plot`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import pandas as pd

from .best import (RANKED_STATUSES, SHOWN_STATUSES, default_mode, pareto_front, headline_metrics,
                   select_best, TABLE_WIDTH, wrap_line)
from .results import load_history, load_results, load_sweep_info

logger = logging.getLogger("sweep.report")


def write_report(experiment_dir: str | Path, *, out_dir: Optional[str | Path] = None,
                 top: int = 5) -> list[Path]:
    """Write the report PNGs to ``out_dir`` (default ``EXPERIMENT_DIR/report``); return them."""
    import matplotlib

    matplotlib.use("Agg")
    results = load_results(experiment_dir)
    info = load_sweep_info(experiment_dir)
    objective = info.get("config", {}).get("objective", {})
    out = Path(out_dir) if out_dir is not None else Path(experiment_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    best = select_best(results, objective=objective, top=max(1, top))
    best_id = str(best.iloc[0]["trial_id"]) if len(best) else None
    finished = report_trials(results)
    written = []
    for metric in ("fvu", "ce_loss_delta", *headline_metrics()):
        if metric in finished.columns and "l0" in finished.columns and finished[metric].notna().any():
            written.append(_pareto_plot(finished, metric, best_id, out / f"pareto_l0_{metric}.png"))
    try:
        history = load_history(experiment_dir)
    except FileNotFoundError:
        history = None
    if history is not None and len(best):
        written.append(_curves_plot(history, list(best["trial_id"]), out / "training_curves.png"))
    from .suite_results import HOOK_COLUMN, hook_winners, layer_plot

    if HOOK_COLUMN in results:  # a suite: the winners' figures against the layer
        plot = layer_plot(hook_winners(results, info), out / "winners_by_layer.png")
        if plot is not None:
            written.append(plot)
    if written:
        logger.info("%s", wrap_line(f"wrote {len(written)} plot(s) to {out}: "
                                    + ", ".join(p.name for p in written), TABLE_WIDTH, "  "))
    else:
        logger.info("no plot written: no trial of %s has finished with metrics yet",
                    experiment_dir)
    return written


def report_trials(results: pd.DataFrame) -> pd.DataFrame:
    """The trials the report plots: those with metrics, the same ones ``sae-sweep best``
    lists (completed ones ranked, stopped and interrupted ones apart)."""
    return results[results["status"].isin(SHOWN_STATUSES)]


def _pareto_plot(frame: pd.DataFrame, metric: str, best_id: Optional[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    data = frame[frame[metric].notna() & frame["l0"].notna()]
    done = data[data["status"].isin(RANKED_STATUSES)]
    short = data[~data["status"].isin(RANKED_STATUSES)]
    front = pareto_front(done, ["l0", metric], ["min", default_mode(metric)]).sort_values("l0")
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.scatter(done["l0"], done[metric], s=28, color="0.6", label="completed trials")
    if len(short):
        ax.scatter(short["l0"], short[metric], s=28, facecolors="none", edgecolors="0.4",
                   label="stopped / interrupted (not ranked)")
    ax.step(front["l0"], front[metric], where="post", color="C0", lw=1.5, label="Pareto front")
    ax.scatter(front["l0"], front[metric], s=36, color="C0")
    if best_id is not None and best_id in set(data["trial_id"]):
        row = data[data["trial_id"] == best_id].iloc[0]
        ax.scatter([row["l0"]], [row[metric]], s=160, marker="*", color="C3", zorder=5,
                   label=f"best ({best_id})")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(metric)
    ax.set_title(f"L0 vs {metric} ({len(data)} trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curves_plot(history: pd.DataFrame, trial_ids: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    panels = [m for m in ("fvu", "l0") if m in history.columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    x = "tokens_seen" if "tokens_seen" in history.columns else "step"
    for ax, metric in zip(axes[0], panels):
        for i, tid in enumerate(trial_ids):
            rows = history[history["trial_id"] == tid].sort_values("step")
            if rows[metric].notna().any():
                ax.plot(rows[x], rows[metric], marker=".", color=f"C{i % 10}", label=tid)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if metric == "fvu":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8, title="top trials")
    fig.suptitle("Training curves of the best trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
