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
  restore, so the study does not carry phantom RUNNING trials.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import optuna
from ray.tune.search.optuna import OptunaSearch

from .sweep_config import ConstraintSpec

logger = logging.getLogger("sweep.searcher")

class SweepSearcher(OptunaSearch):
    """OptunaSearch that never passes NaN to Optuna and records constraint violations."""

    def __init__(self, *args: Any, constraints: Sequence[ConstraintSpec] = (), **kwargs: Any):
        self._constraints = [c.to_dict() for c in constraints]
        super().__init__(*args, **kwargs)

    @property
    def metrics(self) -> list[str]:
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]

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

    def fail_orphans(self) -> int:
        """Mark study trials that are RUNNING but unknown to Ray as FAIL; return how many."""
        if self._ot_study is None:
            return 0
        live = {t.number for t in self._ot_trials.values()}
        orphans = [t for t in self._ot_study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if t.number not in live]
        for t in orphans:
            try:
                self._ot_study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except Exception as exc:  # pragma: no cover - already finished elsewhere
                logger.warning("could not close orphaned Optuna trial %d: %s", t.number, exc)
        return len(orphans)


def _float(value: Any) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: Any) -> bool:
    v = _float(value)
    return v is not None and math.isfinite(v)
