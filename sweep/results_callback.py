"""The Tune callback that keeps ``results.parquet`` and ``history.parquet`` current.

It runs in the driver. Every reported result is appended to the history; the results table is
rebuilt from Tune's full trial list (restored trials included, so after ``--resume`` it is
complete), on every trial completion, error and checkpoint, and at most every
``flush_every_s`` seconds in between. After a driver restart it reloads the history it had
written, and steps that a restarted trial reports again replace their earlier rows. A trial
the dead driver had started but never recorded in Tune's experiment state is not resumed by
Tune (its Optuna trial is marked failed); its rows leave both tables.
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

from .results import (HISTORY_FILE, TrialRow, history_row, merge_history, metrics_from_report,
                      write_results, write_table)

logger = logging.getLogger("sweep.results")


class ResultsCallback(Callback):
    """Writes the sweep's results tables into ``experiment_dir`` as trials report."""

    def __init__(self, experiment_dir: str | Path, *, flush_every_s: float = 5.0):
        self.experiment_dir = str(experiment_dir)
        self.flush_every_s = flush_every_s
        self._init_state()

    def _init_state(self) -> None:
        self._history: Optional[pd.DataFrame] = None
        self._pending: list[dict[str, Any]] = []
        self._last_flush = 0.0
        self._loaded = False

    # Tune pickles its callbacks with the experiment; keep only the configuration.
    def __getstate__(self) -> dict[str, Any]:
        return {"experiment_dir": self.experiment_dir, "flush_every_s": self.flush_every_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_state()

    # -- Tune hooks -------------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        self._load()

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
        self.flush(trials)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self.flush(trials)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.flush(trials)

    # -- writing ------------------------------------------------------------------------------
    def flush(self, trials: list[Trial]) -> None:
        self._load()
        self._history = merge_history(self._history, self._pending)
        self._pending = []
        # Tune's trial list is the truth: a trial the previous driver started but never saved
        # in its experiment state is not resumed (Optuna marks it failed); drop its rows.
        known = {t.trial_id for t in trials}
        if len(self._history) and not self._history["trial_id"].isin(known).all():
            self._history = self._history[self._history["trial_id"].isin(known)]
        if len(self._history):
            write_table(self._history, Path(self.experiment_dir) / HISTORY_FILE)
        write_results([trial_row(t) for t in trials], self.experiment_dir)
        self._last_flush = time.monotonic()

    def _load(self) -> None:
        if self._loaded:
            return
        path = Path(self.experiment_dir) / HISTORY_FILE
        self._history = pd.read_parquet(path) if path.exists() else None
        self._loaded = True


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


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _int(value: Any) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None
