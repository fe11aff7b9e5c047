"""What the CLI prints when a sweep ends: what happened, the best trials, per architecture, and
the exact commands to go on with (``--resume`` first when it was interrupted)."""

from __future__ import annotations

import io
import shlex
from pathlib import Path
from typing import Optional

import pandas as pd

from .best import (TABLE_WIDTH, architecture_lines, architecture_summary, constraints_text,
                   counts_text, figures, format_selection, marks_for, print_configurations,
                   select_best, select_trials, summary_metrics, wrap_line)
from .console import display_path
from .export import best_export_choice
from .replicates import has_replicates
from .results import (LOG_FILE, RESULTS_FILE, SLOT_COLUMN, ResultsNotFoundError, load_results,
                      load_sweep_info)

WALL_COLUMN = "time_wall_s"
"""A trial's wall time in its worker (``trainer.timing``'s column of the whole run)."""


def training_share(frame: pd.DataFrame) -> Optional[tuple[float, float, float, int]]:
    """Where a sweep's slot time went: ``(share, training s, slot s, trials)``.

    Per trial, its slot time is ``time_slot_s`` (what the driver saw it hold a slot), else its
    own ``time_wall_s``; its training seconds are its training phases' (``time_train_s`` +
    ``time_finetune_s``: ``trainer.TRAINING_PHASES``). ``share`` = the training seconds summed
    over the trials that have a slot time / their slot times summed. None when no trial has
    one (a sweep from before the time columns, or nothing reported yet)."""
    from trainer import TRAINING_PHASES, phase_column

    slot = pd.Series(float("nan"), index=frame.index)
    for column in (SLOT_COLUMN, WALL_COLUMN):
        if column in frame.columns:
            slot = slot.fillna(pd.to_numeric(frame[column], errors="coerce"))
    timed = slot.notna() & (slot > 0)
    if not timed.any():
        return None
    trained = 0.0
    for name in TRAINING_PHASES:
        column = phase_column(name)
        if column in frame.columns:
            trained += float(pd.to_numeric(frame.loc[timed, column], errors="coerce")
                             .fillna(0.0).sum())
    total = float(slot[timed].sum())
    return trained / total, trained, total, int(timed.sum())


def training_share_text(frame: pd.DataFrame) -> Optional[str]:
    """``"82% of the trials' slot time in training steps (410 s of 500 s, 6 trials)"``."""
    share = training_share(frame)
    if share is None:
        return None
    fraction, trained, total, n = share
    return (f"{fraction:.0%} of the trials' slot time in training steps ({trained:,.0f} s of "
            f"{total:,.0f} s, {n} trial{'s' if n != 1 else ''}; time_* columns: `best "
            "--all-columns`)")


def summarize_sweep(experiment_dir: str | Path, *, top: int = 5, interrupted: bool = False,
                    resume_command: Optional[str] = None, stream=None) -> str:
    """The closing summary of a sweep (``interrupted``: it was stopped with Ctrl-C and
    ``resume_command`` continues it). Every line fits about 120 characters."""
    exp = Path(experiment_dir)
    q = display_path(exp)
    info = load_sweep_info(exp)
    cfg = info.get("config", {})
    objective = cfg.get("objective", {})
    try:
        frame = load_results(exp)
    except ResultsNotFoundError:
        frame = pd.DataFrame(columns=["trial_id", "status"])
    counts = {str(k): int(v) for k, v in frame["status"].value_counts().items()}
    lines = [f"results: {display_path(exp / RESULTS_FILE)} ({len(frame)} trials"
             + (f": {counts_text(counts)}" if counts else "") + ")",
             f"Ray's log: {display_path(exp / LOG_FILE)}"]
    share = training_share_text(frame) if len(frame) else None
    if share:
        lines.append(wrap_line(f"time: {share}", TABLE_WIDTH))
    selection = select_trials(frame, objective=objective, top=top,
                              searched=list(cfg.get("search_space") or []))
    if selection.empty:
        lines.append("no trial finished" + (" before the interruption" if interrupted else ""))
    else:
        if has_replicates(frame):  # the confirm stage ran: configurations on seed means
            table = io.StringIO()
            print_configurations(frame, cfg, top=top, stream=table)
            lines.append(table.getvalue().rstrip("\n"))
        else:
            lines.append(format_selection(selection, marks=marks_for(stream)))
        summaries = architecture_summary(
            frame, objective=objective, default_architecture=(cfg.get("sae") or {}).get(
                "architecture"))
        if len(summaries) > 1:
            lines.append("per architecture:")
            lines += [wrap_line("  " + line, TABLE_WIDTH, "    ") for line in
                      architecture_lines(summaries, selection)]
        best = select_best(frame, objective=objective, top=1)
        shown = summary_metrics(selection.metrics[0], selection.constraints)
        choice = None
        if cfg.get("hooks"):  # a suite: each hook's winner, not one best across hooks
            from .suite_results import hook_winners, per_hook_lines

            lines += per_hook_lines(hook_winners(frame, info), info)
            best = best.iloc[0:0]
        else:
            choice = best_export_choice(frame, info)
        if choice is not None:
            lines.append(wrap_line(f"what `export --trial best` ships: {choice.reason}"
                                   if choice.trial_id else f"`export --trial best`: "
                                   f"{choice.reason}", TABLE_WIDTH))
        elif len(best):
            row = best.iloc[0].to_dict()
            full = frame[frame["trial_id"] == row["trial_id"]].iloc[0].to_dict()
            lines.append(wrap_line(f"best trial {row['trial_id']} (what `export --trial best` "
                               f"ships): {figures(full, shown)}", TABLE_WIDTH))
        elif selection.constraints and not cfg.get("hooks"):
            lines.append(wrap_line(f"no completed trial meets {constraints_text(selection.constraints)}"
                               ": `export --trial best` has none to ship; choose one with --trial "
                               "ID", TABLE_WIDTH))
    storage = shlex.quote(cfg.get("optuna_storage") or
                          f"sqlite:///{display_path(exp / 'optuna.db', quote=False)}")
    lines.append("next:")
    if interrupted:
        lines.append(f"  {resume_command or 'sae-sweep sweep --resume ' + q}   # continue "
                     "the interrupted sweep")
    lines += [
        f"  sae-sweep best {q} --per-hook",
        f"  sae-sweep export {q} --release {display_path(exp / 'release')}",
    ] if cfg.get("hooks") else [
        f"  sae-sweep best {q} --top 10",
        f"  sae-sweep export {q} --trial best --out {display_path(exp / 'best-sae')}",
    ]
    lines += [
        f"  sae-sweep report {q}",
        f"  optuna-dashboard {storage}   # pip install optuna-dashboard",
    ]
    return "\n".join(lines)
