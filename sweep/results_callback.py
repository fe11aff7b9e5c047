"""The Tune callback that keeps ``results.parquet`` and ``history.parquet`` current.

It runs in the driver. Every reported result is appended to the history; the results table is
rebuilt from Tune's full trial list (restored trials included, so after ``--resume`` it is
complete), on every trial completion, error and checkpoint, and at most every
``flush_every_s`` seconds in between. Steps that a restarted trial reports again replace their
earlier rows.

Writes merge, never overwrite: each flush re-reads both tables from disk (under a file lock,
``.results.lock``) and merges this driver's rows into them (``results.merge_results``,
``results.merge_history``), so a row another writer put there stays, and a ``completed`` row is
never replaced by an unfinished one. (One driver per experiment is the rule --
``sweep.driver_lock`` -- and this is what keeps a mistake from losing trials anyway.)

Trials that a Ctrl-C stopped (the driver's :class:`~sweep.tune_output.InterruptWatch` says which
were unfinished then) are written as ``interrupted``, with ``error`` saying that ``--resume``
continues them, instead of ``stopped``.

No trial disappears. A trial the dead driver had started but never saved in Tune's experiment
state is not resumed by Tune: the searcher marks its Optuna trial failed, queues its
hyperparameters again and records it (``interrupted_trials.json``); its row stays in
``results.parquet`` with status ``interrupted`` and ``error`` saying what became of it (the id
of the trial that re-ran it), and its history rows stay too. A row of the previous results
table that Tune no longer knows keeps its metrics: as it was if it had ended (completed,
failed, stopped), as ``interrupted`` otherwise.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from ray.tune import Callback
from ray.tune.experiment import Trial

from .driver_lock import file_guard
from .results import (HISTORY_FILE, RESULTS_FILE, SLOT_COLUMN, TAIL_COLUMNS, TrialRow, history_row,
                      merge_history, merge_results, metrics_from_report, rows_to_frame,
                      write_table)
from .searcher import read_interrupted

logger = logging.getLogger("sweep.results")


class ResultsCallback(Callback):
    """Writes the sweep's results tables into ``experiment_dir`` as trials report."""

    def __init__(self, experiment_dir: str | Path, *, flush_every_s: float = 5.0,
                 interrupt: Any = None):
        self.experiment_dir = str(experiment_dir)
        self.flush_every_s = flush_every_s
        self.interrupt = interrupt
        """An object with ``interrupted`` and ``unfinished`` (trial ids), e.g. the driver's
        InterruptWatch; None: never mark trials interrupted."""
        self._init_state()

    def _init_state(self) -> None:
        self._pending: list[dict[str, Any]] = []
        self._last_flush = 0.0
        self._loaded = False
        self._previous: list[dict[str, Any]] = []  # results rows written by an earlier driver
        self._slots: dict[str, list[Optional[float]]] = {}  # trial id -> [started, ended]

    # Tune pickles its callbacks with the experiment; keep only the configuration.
    def __getstate__(self) -> dict[str, Any]:
        return {"experiment_dir": self.experiment_dir, "flush_every_s": self.flush_every_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.interrupt = None
        self._init_state()

    # -- Tune hooks -------------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        self._load()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        # A trial's slot time is what this driver saw it hold a slot, from Tune starting it
        # (its worker's start included) to its end; unknown for a trial an earlier driver ran.
        if trial.trial_id not in self._slots and not (trial.last_result or {}).get("step"):
            self._slots[trial.trial_id] = [time.monotonic(), None]

    def _slot_ended(self, trial: Trial) -> None:
        slot = self._slots.get(trial.trial_id)
        if slot is not None and slot[1] is None:
            slot[1] = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict, **info: Any) -> None:
        if not result.get("error"):  # a diverged trial's last report holds no metrics
            self._pending.append(history_row(trial.trial_id, result))
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush(trials)

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Any,
                      **info: Any) -> None:
        self.flush(trials)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        self._slot_ended(trial)
        self.flush(trials)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._slot_ended(trial)
        self.flush(trials)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.flush(trials)

    # -- writing ------------------------------------------------------------------------------
    def flush(self, trials: list[Trial]) -> None:
        self._load()
        exp = Path(self.experiment_dir)
        frame = rows_to_frame([self._with_slot(trial_row(t)) for t in trials])
        self._mark_interrupted(frame)
        lost = self._lost_rows({t.trial_id for t in trials})
        if lost:
            frame = _append_rows(frame, lost)
        with file_guard(exp / ".results.lock"):
            frame = merge_results(_read(exp / RESULTS_FILE), frame)
            history = merge_history(_read(exp / HISTORY_FILE), self._pending)
            known = set(frame["trial_id"]) | {row["trial_id"] for row in self._pending}
            if len(history) and not history["trial_id"].isin(known).all():
                history = history[history["trial_id"].isin(known)]
            if len(history):
                write_table(history, exp / HISTORY_FILE)
            write_table(frame, exp / RESULTS_FILE)
        self._pending = []
        self._last_flush = time.monotonic()

    def _with_slot(self, row: TrialRow) -> TrialRow:
        """``row`` with ``time_slot_s`` once its trial ended under this driver."""
        slot = self._slots.get(row.trial_id)
        if slot is not None and slot[0] is not None and slot[1] is not None:
            row.metrics[SLOT_COLUMN] = slot[1] - slot[0]
        return row

    def _mark_interrupted(self, frame: pd.DataFrame) -> None:
        """Rows of the trials a Ctrl-C left unfinished: ``interrupted``, resumable."""
        watch = self.interrupt
        if watch is None or not getattr(watch, "interrupted", False) or frame.empty:
            return
        hit = frame["trial_id"].isin(set(watch.unfinished)) & ~frame["status"].isin(
            ("completed", "failed"))
        for i in frame.index[hit]:
            step = frame.at[i, "step"]
            frame.at[i, "status"] = "interrupted"
            frame.at[i, "error"] = (
                "interrupted: the sweep was stopped (Ctrl-C) while this trial ran"
                + (f" (at step {int(step)})" if not _missing(step) else " (before its first "
                   "report)") + "; sae-sweep sweep --resume continues it")

    def _lost_rows(self, known: set[str]) -> list[dict[str, Any]]:
        """Rows of trials Tune does not know (see the module docstring)."""
        records = {r["trial_id"]: r for r in read_interrupted(self.experiment_dir)}
        rows = []
        for old in self._previous:
            tid = old["trial_id"]
            if tid in known:
                continue
            row = dict(old)
            if row.get("status") not in ("completed", "failed", "stopped"):
                row.update(status="interrupted", error=_interrupted_text(records.get(tid), old))
            rows.append(row)
        seen = known | {row["trial_id"] for row in rows}
        for tid, record in records.items():
            if tid not in seen:
                rows.append({"trial_id": tid, "status": "interrupted", "num_failures": 0,
                             "error": _interrupted_text(record, None), "final": False,
                             **{k: v for k, v in (record.get("params") or {}).items()
                                if _is_scalar(v)}})
        return rows

    def _load(self) -> None:
        if self._loaded:
            return
        frame = _read(Path(self.experiment_dir) / RESULTS_FILE)
        if frame is not None:
            self._previous = [{k: v for k, v in row.items() if not _missing(v)}
                              for row in frame.to_dict("records")]
        self._loaded = True


def _read(path: Path) -> Optional[pd.DataFrame]:
    try:
        return pd.read_parquet(path) if path.exists() else None
    except (OSError, ValueError) as exc:  # pragma: no cover - a damaged table: rebuilt
        logger.warning("%s could not be read (%s); writing it again from this driver's trials",
                       path, exc)
        return None


def trial_row(trial: Trial) -> TrialRow:
    """A Tune trial as a :class:`TrialRow` (its config, last result, status and error)."""
    result = trial.last_result or {}
    status = {
        Trial.RUNNING: "running", Trial.PENDING: "pending", Trial.PAUSED: "paused",
        Trial.ERROR: "failed",
    }.get(trial.status)
    error = trial_error(trial) if trial.status == Trial.ERROR else result.get("error") or None
    if status is None:  # TERMINATED: diverged, completed its budget, or stopped early (ASHA/time)
        status = "failed" if error else "completed" if result.get("final") else "stopped"
    checkpoint = trial.checkpoint
    return TrialRow(
        trial_id=trial.trial_id,
        status=status,
        error=error,
        num_failures=int(trial.run_metadata.num_failures),
        node_id=result.get("node_id") or None,
        node_ip=result.get("node_ip") or None,
        params={k: v for k, v in (trial.config or {}).items() if _is_scalar(v)},
        metrics=metrics_from_report(result),
        step=_int(result.get("step")),
        tokens_seen=_int(result.get("tokens_seen")),
        train_seconds=result.get("train_seconds"),
        training_iteration=_int(result.get("training_iteration")),
        checkpoint_path=checkpoint.path if checkpoint is not None else None,
        final=bool(result.get("final", False)),
    )


_EXC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Diverged|Interrupt)): (.+)$")


def trial_error(trial: Trial) -> str:
    """The last exception line of the trial's error file (e.g. ``TrialDiverged: diverged: ...``),
    or a generic message when Ray kept none."""
    text = None
    try:
        text = trial.get_error()
    except Exception:  # pragma: no cover - storage unreachable
        text = None
    if not text and trial.error_file and Path(trial.error_file).exists():
        text = Path(trial.error_file).read_text()
    if not text:
        return "failed (no error recorded by Ray)"
    lines = [ln for ln in str(text).splitlines() if _EXC_LINE.match(ln)]
    if lines:
        name, message = _EXC_LINE.match(lines[-1]).groups()  # type: ignore[union-attr]
        return f"{name.rsplit('.', 1)[-1]}: {message.strip()}"
    return str(text).strip().splitlines()[-1][:500]


def _interrupted_text(record: Optional[dict], old: Optional[dict]) -> str:
    """What became of a trial the driver lost (``record``: its interrupted_trials.json entry;
    ``old``: its row in the previous results table)."""
    step = (old or {}).get("step")
    text = ("interrupted: the driver stopped before Ray Tune saved this trial"
            + (f" (at step {int(step)})" if step is not None else " (before its first report)"))
    if (old or {}).get("replicate_of") is not None:  # the confirm stage re-plans it
        return text + "; the confirm stage runs this replicate again as a new trial"
    if record is None:
        return text + "; it was not re-run"
    if record.get("rerun_as"):
        return text + f"; its hyperparameters re-ran as trial {record['rerun_as']}"
    if record.get("requeued"):
        return text + "; its hyperparameters are queued to run again"
    return text + "; it was not re-run"


def _append_rows(frame: pd.DataFrame, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """``frame`` plus ``rows`` (dicts), new columns placed before the tail columns."""
    extra = pd.DataFrame(rows)
    combined = pd.concat([frame, extra], ignore_index=True) if len(frame) else extra
    head = [c for c in frame.columns if c not in TAIL_COLUMNS]
    head += [c for c in extra.columns if c not in head and c not in TAIL_COLUMNS]
    return combined.reindex(columns=head + list(TAIL_COLUMNS))


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _int(value: Any) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None
