"""A suite's results per hook (no Ray needed): the winner of every hook, their table and the
plot of the winners' figures against the layer.

The winner of a hook is what ``best`` / ``export --trial best`` would pick in a one-hook sweep
of that hook (:func:`sweep.best.select_best`: completed trials meeting the sweep's constraints,
best by its objective -- the validation figures), shown with its ``test_*`` figures (what to
report). A results table without a ``hook`` column (a one-hook sweep) is one hook: the sweep's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import IO, Any, Optional, Sequence

import pandas as pd

from activation_cache import parse_block_hook

from .best import QueryError, select_best

HOOK_COLUMN = "hook"
WINNER_METRICS = ("fvu", "l0", "ce_loss_delta", "dead_fraction")
"""The figures shown per winner (val and test), where measured."""


def table_hooks(frame: pd.DataFrame, info: dict[str, Any]) -> list[str]:
    """The hooks of a results table, in layer order (the sweep's own hook for one-hook
    sweeps)."""
    config = info.get("config", {})
    if HOOK_COLUMN not in frame:
        hook = config.get("hook")
        return [hook] if hook else []
    listed = list(config.get("hooks") or [])
    seen = [h for h in frame[HOOK_COLUMN].dropna().unique() if h not in listed]
    return [h for h in listed if h in set(frame[HOOK_COLUMN])] + sorted(seen, key=_layer_key)


def hook_frame(frame: pd.DataFrame, hook: str, info: dict[str, Any]) -> pd.DataFrame:
    if HOOK_COLUMN not in frame:
        return frame if hook in table_hooks(frame, info) else frame.iloc[0:0]
    return frame[frame[HOOK_COLUMN] == hook]


def select_hooks(frame: pd.DataFrame, spec: str, info: dict[str, Any]) -> list[str]:
    """The hooks ``--hook`` names (a name, friendly name, pattern or glob) among the table's."""
    from activation_cache import UserError, expand_hook_pattern

    try:
        return expand_hook_pattern(spec, table_hooks(frame, info), field="--hook")
    except UserError as exc:
        raise QueryError(str(exc)) from None


def hook_winners(frame: pd.DataFrame, info: dict[str, Any],
                 hooks: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per hook: ``hook``, ``layer``, ``trial_id``, ``trials`` (completed / all) and the
    winner's columns (NaN trial when no trial of the hook meets the constraints)."""
    objective = info.get("config", {}).get("objective", {})
    rows = []
    for hook in hooks or table_hooks(frame, info):
        part = hook_frame(frame, hook, info)
        best = select_best(part, objective=objective, top=1) if len(part) else part
        row: dict[str, Any] = dict(best.iloc[0]) if len(best) else {"trial_id": None}
        row.update(hook=hook, layer=_layer(hook),
                   trials=f"{int((part['status'] == 'completed').sum())}/{len(part)}")
        rows.append(row)
    return pd.DataFrame(rows)


def per_hook_lines(winners: pd.DataFrame, info: dict[str, Any]) -> list[str]:
    """The ``best --per-hook`` table: one line per hook with the winner's val and test
    figures."""
    objective = info.get("config", {}).get("objective", {})
    metric = objective.get("metric", "fvu")
    metric = metric[0] if isinstance(metric, list) else metric
    shown = [m for m in dict.fromkeys([metric, *WINNER_METRICS])
             if m in winners and winners[m].notna().any()]
    header = ["hook", "trials", "trial"] + [f"val {m}" for m in shown] + [
        f"test {m}" for m in shown if f"test_{m}" in winners]
    lines = []
    for _, row in winners.iterrows():
        cells = [row["hook"], row["trials"], row["trial_id"] or "none met the constraints"]
        if row["trial_id"]:
            cells += [_fmt(row.get(m)) for m in shown]
            cells += [_fmt(row.get(f"test_{m}")) for m in shown if f"test_{m}" in winners]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *[
        r + [""] * (len(header) - len(r)) for r in lines])]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    constraints = objective.get("constraints") or []
    goal = f"{'min' if objective.get('mode', 'min') == 'min' else 'max'} val {metric}"
    if constraints:
        goal += " subject to " + " and ".join(
            " and ".join(p for p in ((f"{c['metric']} >= {c['min']:g}" if c.get("min") is not None
                                      else ""), (f"{c['metric']} <= {c['max']:g}"
                                                 if c.get("max") is not None else "")) if p)
            for c in constraints)
    return [f"winner per hook ({goal}; test = held-out figures to report):"] + out


def print_per_hook(experiment_dir: str | Path, *, hook: Optional[str] = None,
                   stream: Optional[IO[str]] = None) -> pd.DataFrame:
    """``sae-sweep best EXP --per-hook``: print every hook's winner; return the winners."""
    import sys

    from .results import load_results, load_sweep_info

    frame = load_results(experiment_dir)
    info = load_sweep_info(experiment_dir)
    hooks = select_hooks(frame, hook, info) if hook else None
    winners = hook_winners(frame, info, hooks)
    print("\n".join(per_hook_lines(winners, info)), file=stream or sys.stdout)
    return winners


def layer_plot(winners: pd.DataFrame, path: Path, *, title: str = "") -> Optional[Path]:
    """The winners' test figures (val where no test) -- fvu, l0, ce_loss_delta when measured --
    against the layer, one panel each; None when no winner has a layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = winners[winners["trial_id"].notna() & winners["layer"].notna()].sort_values("layer")
    panels = []
    for m in ("fvu", "l0", "ce_loss_delta"):
        column = f"test_{m}" if f"test_{m}" in data and data[f"test_{m}"].notna().any() else m
        if column in data and data[column].notna().any():
            panels.append((m, column))
    if data.empty or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (m, column) in zip(axes[0], panels):
        ax.plot(data["layer"], data[column], marker="o", color="C0")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{m} ({'test' if column.startswith('test_') else 'val'})")
        ax.set_xticks(list(data["layer"].astype(int)))
        ax.grid(alpha=0.3)
    fig.suptitle(title or "winner per layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layer(hook: Any) -> Optional[int]:
    block = parse_block_hook(hook) if isinstance(hook, str) else None
    return None if block is None else block.layer


def _layer_key(hook: str) -> tuple:
    block = parse_block_hook(hook)
    return (0, block.point, block.layer) if block else (1, hook, 0)


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(v):
        return "-"
    return f"{v:.4g}"
