"""The sweep's results tables: one typed row per trial, one row per reported step.

``EXPERIMENT_DIR/results.parquet`` has one row per trial (:class:`TrialRow`):

    trial_id, status, error, num_failures, node_id, node_ip,
    <every hyperparameter of the trial, one column each: architecture, d_sae, top_k, lr, ...;
     null where the trial's architecture has no such field (a standard SAE's top_k), never a
     default that looks real; integer hyperparameters are nullable integers>,
    <the final metrics record: fvu, explained_variance, l0, l0_train, fvu_train, mse,
     dead_fraction, dense_fraction, kl_div, ce_loss_delta, ce_loss_score, ... (None when not
     computed)>,
    <where the trial's wall time went (trainer.timing): time_startup_s, time_model_load_s,
     time_train_s, time_finetune_s, time_eval_val_s, time_eval_test_s, time_calibration_s,
     time_checkpoint_s, time_report_s (one per phase the trial entered), time_eval_s (the
     eval_* phases summed), time_other_s (in no phase) and time_wall_s (the trial's wall time
     in its worker: the phases + time_other_s); time_slot_s (SLOT_COLUMN: its slot time seen
     by the driver, >= time_wall_s; null for a trial an earlier driver ran)>,
    step, tokens_seen, train_seconds, training_iteration, checkpoint_path, final

``status`` is ``completed`` (trained its whole budget), ``failed`` (an error, e.g. divergence;
``error`` says why), ``stopped`` (stopped early by ASHA or the time budget), ``running``,
``pending``, ``paused`` or ``interrupted`` (the driver was killed before Ray Tune saved the
trial, so it could not be resumed; ``error`` says what became of it -- usually "its
hyperparameters re-ran as trial X"). Every headline metric (``fvu``, ``l0``...) is the shipped
encoder's (see trainer.metrics). The metrics record's own ``lr`` (the scheduled learning rate of
the last step) is stored as ``lr_current`` so it cannot clash with the ``lr`` hyperparameter.

``EXPERIMENT_DIR/history.parquet`` has one row per reported metrics record: ``trial_id``, ``step``
and the same metric columns. Both files are rewritten atomically (temp file + rename) while the
sweep runs, so a half-done sweep can be read with pandas, pyarrow or DuckDB without Ray.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import pandas as pd

from activation_cache import UserError

RESULTS_FILE = "results.parquet"
HISTORY_FILE = "history.parquet"
SWEEP_FILE = "sweep.json"
"""The resolved sweep config (and the cache's d_in), written by the driver for best/export/report."""
LOG_FILE = "sweep.log"
"""Ray's output and our own lines, appended per driver run."""

SLOT_COLUMN = "time_slot_s"
"""Seconds a trial held its slot as the driver saw it (Tune starting it, its worker's start
included, to its end); next to the trial's own ``time_<phase>_s`` / ``time_wall_s`` columns
(``trainer.timing``)."""

STATUSES = ("completed", "failed", "stopped", "running", "pending", "paused", "interrupted")
FIXED_COLUMNS = ("trial_id", "status", "error", "num_failures", "node_id", "node_ip")
TAIL_COLUMNS = ("step", "tokens_seen", "train_seconds", "training_iteration", "checkpoint_path",
                "final")
# Keys the trainable reports next to the metrics that are not metrics.
REPORT_META_KEYS = frozenset({"final", "node_id", "node_ip", "train_seconds", "step",
                              "tokens_seen", "error"})
# Keys Ray Tune adds to every result; they are not part of our schema.
TUNE_AUTO_KEYS = frozenset({
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration",
    "trial_id", "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
    "config", "time_since_restore", "iterations_since_restore", "experiment_tag",
    "timesteps_total", "episodes_total", "timesteps_since_restore", "experiment_id",
})


class ResultsNotFoundError(UserError, FileNotFoundError):
    """The experiment folder has no results table (not a sweep, or no trial reported yet)."""


@dataclass
class TrialRow:
    """One trial's line in ``results.parquet`` (see the module docstring for the columns)."""

    trial_id: str
    status: str
    error: Optional[str] = None
    num_failures: int = 0
    node_id: Optional[str] = None
    node_ip: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    step: Optional[int] = None
    tokens_seen: Optional[int] = None
    train_seconds: Optional[float] = None
    training_iteration: Optional[int] = None
    checkpoint_path: Optional[str] = None
    final: bool = False

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"TrialRow.status: must be one of {STATUSES}, got {self.status!r}")
        clash = (set(self.params) & set(self.metrics)) | (
            (set(self.params) | set(self.metrics)) & (set(FIXED_COLUMNS) | set(TAIL_COLUMNS)))
        if clash:
            raise ValueError(f"TrialRow: column name(s) {sorted(clash)} used twice")

    def flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in FIXED_COLUMNS}
        out.update(self.params)
        out.update(self.metrics)
        out.update({name: getattr(self, name) for name in TAIL_COLUMNS})
        return out


def metrics_from_report(report: Mapping[str, Any]) -> dict[str, float]:
    """The metric columns of one reported result (numbers only; Ray's own keys left out)."""
    out: dict[str, float] = {}
    for key, value in report.items():
        if key in TUNE_AUTO_KEYS or key in REPORT_META_KEYS:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = float(value)
    return out


def history_row(trial_id: str, report: Mapping[str, Any]) -> dict[str, Any]:
    """One ``history.parquet`` row from one reported result."""
    row: dict[str, Any] = {"trial_id": trial_id, "step": _int_or_none(report.get("step")),
                           "tokens_seen": _int_or_none(report.get("tokens_seen")),
                           "train_seconds": report.get("train_seconds"),
                           "training_iteration": _int_or_none(report.get("training_iteration"))}
    row.update(metrics_from_report(report))
    return row


def rows_to_frame(rows: Iterable[TrialRow]) -> pd.DataFrame:
    """A DataFrame with the column order of the schema (params, then metrics, sorted)."""
    rows = list(rows)
    params = sorted({k for r in rows for k in r.params})
    metrics = sorted({k for r in rows for k in r.metrics})
    columns = list(FIXED_COLUMNS) + params + metrics + list(TAIL_COLUMNS)
    frame = pd.DataFrame([r.flat() for r in rows], columns=columns)
    for name in params:  # one type per column: ints stay ints where a value is missing
        values = [r.params[name] for r in rows if r.params.get(name) is not None]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            frame[name] = frame[name].astype("Int64")
    return frame


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a Parquet file atomically (readers never see a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_results(rows: Iterable[TrialRow], experiment_dir: str | Path) -> pd.DataFrame:
    frame = rows_to_frame(rows)
    write_table(frame, Path(experiment_dir) / RESULTS_FILE)
    return frame


def merge_results(on_disk: Optional[pd.DataFrame], fresh: pd.DataFrame) -> pd.DataFrame:
    """The results table to write: ``fresh`` (this driver's rows) merged into what the file
    holds, so that no writer can drop a trial another one wrote.

    * a trial only on disk keeps its row as it is;
    * a trial in both gets its fresh row, except that a ``completed`` row is never replaced by
      an unfinished one (a completed trial that a restored Tune replays, or that a second
      driver knows only as pending or running);
    * rows keep the file's order, new trials come after."""
    if on_disk is None or on_disk.empty or "trial_id" not in on_disk:
        return fresh.reset_index(drop=True)
    fresh_status = dict(zip(fresh["trial_id"], fresh["status"]))
    ids = on_disk["trial_id"]
    disk_wins = ~ids.isin(fresh_status) | (
        (on_disk["status"] == "completed") & (ids.map(fresh_status) != "completed"))
    kept = on_disk[disk_wins]
    new = fresh[~fresh["trial_id"].isin(set(kept["trial_id"]))]
    merged = pd.concat([f for f in (kept, new) if len(f)] or [fresh], ignore_index=True)
    position = {tid: n for n, tid in enumerate(ids)}
    position.update({tid: len(ids) + n for n, tid in enumerate(fresh["trial_id"])
                     if tid not in position})
    merged = merged.iloc[merged["trial_id"].map(position).argsort(kind="stable")]
    columns = [c for c in fresh.columns if c not in TAIL_COLUMNS]
    columns += [c for c in on_disk.columns if c not in columns and c not in TAIL_COLUMNS]
    columns += [c for c in TAIL_COLUMNS if c in merged.columns]
    return merged.reindex(columns=columns).reset_index(drop=True)


def merge_history(existing: Optional[pd.DataFrame], new_rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Append rows; a step reported twice (a trial re-run from its checkpoint after a crash)
    keeps its latest report, so the history reads as if nothing happened."""
    frames = [f for f in (existing, pd.DataFrame(new_rows) if new_rows else None)
              if f is not None and len(f)]
    if not frames:
        return pd.DataFrame(columns=["trial_id", "step"])
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    frame = frame.drop_duplicates(subset=["trial_id", "step"], keep="last")
    return frame.sort_values(["trial_id", "step"], kind="stable").reset_index(drop=True)


def load_results(experiment_dir: str | Path) -> pd.DataFrame:
    """``results.parquet`` of a sweep as a DataFrame (a clear error when there is none)."""
    path = Path(experiment_dir) / RESULTS_FILE
    if not path.exists():
        raise ResultsNotFoundError(
            f"{path}: no results table; is {experiment_dir} a sweep's experiment folder "
            f"(`sae-sweep sweep` writes it as the first trial reports)?")
    return pd.read_parquet(path)


class CorruptExperimentError(UserError, ValueError):
    """A file of the experiment folder cannot be read (e.g. an edited, invalid ``sweep.json``)."""


def load_history(experiment_dir: str | Path) -> pd.DataFrame:
    path = Path(experiment_dir) / HISTORY_FILE
    if not path.exists():
        raise ResultsNotFoundError(f"{path}: no history table (no trial has reported yet)")
    return pd.read_parquet(path)


def load_sweep_info(experiment_dir: str | Path) -> dict[str, Any]:
    """The resolved sweep config the driver stored (``{}`` when absent, e.g. hand-made tables)."""
    path = Path(experiment_dir) / SWEEP_FILE
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptExperimentError(f"{path}: not valid JSON ({exc}); it is the sweep's "
                                     "resolved config, written by the driver") from None
    if not isinstance(info, dict):
        raise CorruptExperimentError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def _int_or_none(value: Any) -> Optional[int]:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return int(value)
