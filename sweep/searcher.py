"""Ray Tune's OptunaSearch made safe for long, restartable sweeps.

Three things Ray's wrapper does not do (see ANCHORS.md, "Ray Tune + Optuna pitfalls"):

* **Never tell Optuna a NaN.** A non-finite or missing objective value makes Optuna's ``tell``
  raise, and Ray only logs it: the study keeps a trial RUNNING forever. Here such a trial is
  told as FAIL, and non-finite intermediate values are not reported at all.
* **Constraints.** When the objective has constraints (e.g. ``l0 <= 64``), the violation of each
  is set on the Optuna trial (``Trial.set_constraint``) before ``tell``, so TPE and NSGA-II
  learn where the feasible region is.
* **Trials finished twice.** When the driver dies after a trial finished but before Tune saved
  that, the resumed Tune re-runs it from its final checkpoint (the trainer only re-reports);
  Optuna already holds the result, so those reports are ignored instead of crashing the sweep.
* **Orphans after a driver crash.** Trials the study had handed out but Ray never recorded
  (the driver died between Optuna's ``ask`` and Ray's experiment checkpoint) are marked FAIL on
  restore, so the study does not carry phantom RUNNING trials, and their hyperparameters are
  queued again (``study.enqueue_trial``), so the next trial re-runs them. Each one is recorded
  in ``EXPERIMENT_DIR/interrupted_trials.json`` (its Ray trial id, its hyperparameters and the
  id of the trial that re-ran it), which the results table shows as status ``interrupted``:
  no trial disappears.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import optuna
from ray.tune.search.optuna import OptunaSearch

from .sweep_config import ConstraintSpec

logger = logging.getLogger("sweep.searcher")

INTERRUPTED_FILE = "interrupted_trials.json"


class SweepSearcher(OptunaSearch):
    """OptunaSearch that never passes NaN to Optuna, records constraint violations and re-runs
    the trials a killed driver lost (see the module docstring).

    ``record_dir``: the experiment folder, where lost trials are recorded (None: not recorded).
    """

    def __init__(self, *args: Any, constraints: Sequence[ConstraintSpec] = (),
                 record_dir: Optional[str] = None, **kwargs: Any):
        self._constraints = [c.to_dict() for c in constraints]
        self._record_dir = record_dir
        super().__init__(*args, **kwargs)

    @property
    def metrics(self) -> list[str]:
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]

    def suggest(self, trial_id: str) -> Optional[dict]:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            try:  # lets a restarted driver name the Ray trial an orphan belonged to
                ot_trial.set_user_attr("ray_trial_id", trial_id)
            except Exception as exc:  # pragma: no cover - never let bookkeeping stop a sweep
                logger.debug("could not tag Optuna trial %s: %s", ot_trial.number, exc)
            rerun_of = ot_trial.user_attrs.get("rerun_of")
            if rerun_of:
                logger.info("trial %s re-runs the hyperparameters of interrupted trial %s",
                            trial_id, rerun_of)
                self._update_record(rerun_of, rerun_as=trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id not in self._ot_trials:
            return
        value = result.get(self.metric)
        if not _finite(value):
            return
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            # after a driver crash Tune may re-run a trial Optuna already recorded as finished
            # (it restarts from the final checkpoint and only re-reports): nothing to add
            pass

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        values = [None if result is None else result.get(m) for m in self.metrics]
        try:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
            for c in self._constraints if result is not None else ():
                spec = ConstraintSpec.from_dict(c)
                ot_trial.set_constraint(spec.as_query().replace("`", ""),
                                        spec.violation(_float(result.get(spec.metric))))
            if error or result is None or not all(_finite(v) for v in values):
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
            else:
                told = [float(v) for v in values]
                self._ot_study.tell(ot_trial, told if len(told) > 1 else told[0])
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told before a driver crash; Tune completed it again after the restore
        except Exception as exc:  # never let Optuna bookkeeping kill the sweep
            logger.warning("Optuna could not record trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.fail_orphans()

    def fail_orphans(self, *, requeue: bool = True) -> int:
        """Mark study trials that are RUNNING but unknown to Ray as FAIL; queue their
        hyperparameters again (``requeue``) and record them as interrupted; return how many."""
        if self._ot_study is None:
            return 0
        live = {t.number for t in self._ot_trials.values()}
        orphans = [t for t in self._ot_study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if t.number not in live]
        for t in orphans:
            ray_id = str(t.user_attrs.get("ray_trial_id") or f"optuna-{t.number}")
            try:
                self._ot_study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except Exception as exc:  # pragma: no cover - already finished elsewhere
                logger.warning("could not close orphaned Optuna trial %d: %s", t.number, exc)
                continue
            if requeue:
                self._ot_study.enqueue_trial(dict(t.params), user_attrs={"rerun_of": ray_id})
            self._add_record({"trial_id": ray_id, "optuna_trial": t.number,
                              "params": dict(t.params), "requeued": requeue, "rerun_as": None})
            logger.warning(
                "trial %s had started but Ray Tune had not saved it when the driver stopped; "
                "%s (results.parquet shows it as interrupted)", ray_id,
                "its hyperparameters run again as a new trial" if requeue else "it is not re-run")
        return len(orphans)

    # -- the record of interrupted trials ---------------------------------------------------
    def _record_path(self) -> Optional[Path]:
        record_dir = getattr(self, "_record_dir", None)
        return Path(record_dir) / INTERRUPTED_FILE if record_dir else None

    def _add_record(self, record: dict) -> None:
        path = self._record_path()
        if path is None:
            return
        records = [r for r in read_interrupted(path.parent) if r["trial_id"] != record["trial_id"]]
        _write_json(path, records + [record])

    def _update_record(self, trial_id: str, **changes: Any) -> None:
        path = self._record_path()
        if path is None:
            return
        records = read_interrupted(path.parent)
        for r in records:
            if r["trial_id"] == trial_id:
                r.update(changes)
        _write_json(path, records)


def read_interrupted(experiment_dir: str | Path) -> list[dict]:
    """The trials a killed driver lost (``interrupted_trials.json``; [] when none): dicts with
    ``trial_id``, ``optuna_trial``, ``params``, ``requeued`` and ``rerun_as`` (the id of the
    trial that re-ran them, None until it starts)."""
    path = Path(experiment_dir) / INTERRUPTED_FILE
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict) and r.get("trial_id")] \
        if isinstance(records, list) else []


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _float(value: Any) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: Any) -> bool:
    v = _float(value)
    return v is not None and math.isfinite(v)


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable: Optuna 5 gives it a ``threading.Lock``, and Tune
    pickles the searcher (and so its sampler) whenever it saves the experiment state, which
    failed with ``cannot pickle '_thread.lock' object``. The lock only guards the sampler within
    one process, so a fresh one is made when it is unpickled."""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        import threading

        self.__dict__.update(state)
        if "_thread_lock" not in state:
            self._thread_lock = threading.Lock()
