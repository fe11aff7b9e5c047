"""The sweep's live view: a Tune callback printing one line per trial event (see sweep.console
for what it prints and how). Ray's own output and the repairs of restored Tune state are
sweep.tune_output's."""

from __future__ import annotations

import time
from typing import Any, Optional

from ray.tune import Callback
from ray.tune.experiment import Trial

from .console import ConsoleSettings, elapsed, finite, fmt_value, logger


class ConsoleCallback(Callback):
    """The sweep's live view (see the module docstring). Runs in the driver."""

    def __init__(self, settings: ConsoleSettings):
        self.settings = settings
        self._init_state()

    def _init_state(self) -> None:
        self._started = time.monotonic()
        self._last_line: dict[str, float] = {}
        self._last_progress = time.monotonic()
        self._restored: Optional[set[str]] = None  # trials Tune restored (set at the first step)
        self._reported: set[str] = set()
        self._recovering: set[str] = set()  # trials restarting after a lost worker
        self._ended: dict[str, str] = {}  # trial id -> completed/stopped/failed (Tune sets the
        # trial's status only after calling its callbacks)

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_state()

    # -- Tune hooks -------------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        self._init_state()

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self._restored is None:
            self._restored = {t.trial_id for t in trials} if self.settings.resumed else set()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        step = (trial.last_result or {}).get("step")
        recovering = trial.trial_id in self._recovering
        self._recovering.discard(trial.trial_id)
        restored = trial.trial_id in (self._restored or ()) and not recovering
        if trial.checkpoint is not None:
            why = "the driver restarted" if restored else "its worker was lost"
            self._say(trial, f"resumed from its checkpoint at step {step} ({why})",
                      style="yellow")
        elif restored or recovering:
            why = "the driver stopped" if restored else "its worker was lost"
            self._say(trial, f"restarted from scratch ({why} before its first checkpoint): "
                      + _params(trial), style="yellow")
        else:
            self._say(trial, "started: " + _params(trial), style="cyan")

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial,
                         **info: Any) -> None:
        self._recovering.add(trial.trial_id)
        self._say(trial, f"lost its worker ({_short_error(trial)}); retrying from its last "
                  f"checkpoint (failure {trial.run_metadata.num_failures}, at most "
                  f"{trial.max_failures} retries)", style="yellow")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict,
                        **info: Any) -> None:
        now = time.monotonic()
        if result.get("error") or result.get("final"):
            return  # the completion line carries it
        last = self._last_line.get(trial.trial_id)
        first = trial.trial_id not in self._reported
        self._reported.add(trial.trial_id)
        if first or last is None or now - last >= self.settings.report_every_s:
            self._say(trial, f"step {result.get('step', '?')}: " + self._metrics(result)
                      + self._speed(result))
        if now - self._last_progress >= self.settings.heartbeat_s:
            self._progress(trials)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("error"):
            self._ended[trial.trial_id] = "failed"
            self._say(trial, f"failed: {result['error']}", style="red")
        elif result.get("final"):
            self._ended[trial.trial_id] = "completed"
            self._say(trial, "completed: " + self._metrics(result) + self._budget(result),
                      style="green")
        else:
            self._ended[trial.trial_id] = "stopped"
            self._say(trial, f"stopped early at step {result.get('step', '?')}: "
                      + self._metrics(result) + self._budget(result), style="yellow")
        self._progress(trials)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        from .results_callback import trial_error

        retries = trial.run_metadata.num_failures
        self._ended[trial.trial_id] = "failed"
        self._say(trial, "failed: " + trial_error(trial)
                  + (f" (after {retries} attempts)" if retries > 1 else ""), style="red")
        self._progress(trials)

    # -- lines ------------------------------------------------------------------------------
    def _say(self, trial: Trial, text: str, *, style: Optional[str] = None) -> None:
        self._last_line[trial.trial_id] = time.monotonic()
        stamp = elapsed(time.monotonic() - self._started)
        line = fold(f"[{stamp}] trial {trial.trial_id} {text}")
        logger.info("%s", line, extra={"style": style} if style else None)

    def _metrics(self, result: dict) -> str:
        """``val fvu 0.41, l0 32``: the reported figures, labelled with their split."""
        shown = [m for m in self.settings.metrics if m in result and result[m] is not None]
        groups = []
        for split, names in (("val", [m for m in shown if not m.startswith("test_")]),
                             ("test", [m[5:] for m in shown if m.startswith("test_")])):
            if names:
                prefix = "test_" if split == "test" else ""
                groups.append(f"{split} " + ", ".join(
                    f"{m} {fmt_value(result[prefix + m])}" for m in names))
        return "; ".join(groups)

    @staticmethod
    def _speed(result: dict) -> str:
        tokens, speed = result.get("tokens_seen"), result.get("tokens_per_s")
        bits = []
        if tokens is not None:
            bits.append(f"{int(tokens):,} tokens")
        if finite(speed):
            bits.append(f"{float(speed):,.0f} tok/s")
        return f" ({', '.join(bits)})" if bits else ""

    @staticmethod
    def _budget(result: dict) -> str:
        bits = []
        if result.get("step") is not None:
            bits.append(f"{result['step']} steps")
        if result.get("tokens_seen") is not None:
            bits.append(f"{int(result['tokens_seen']):,} tokens")
        if finite(result.get("train_seconds")):
            bits.append(f"{float(result['train_seconds']):.1f} s")
        return f" ({', '.join(bits)})" if bits else ""

    def _progress(self, trials: list[Trial]) -> None:
        self._last_progress = time.monotonic()
        logger.info("[%s] %s", elapsed(time.monotonic() - self._started),
                    progress_line(trials, self.settings, self._ended), extra={"style": "bold"})


LINE_WIDTH = 120
"""Live-view lines longer than this are folded (a log file gets no overlong line)."""


def fold(line: str, width: int = LINE_WIDTH) -> str:
    """``line`` folded at spaces into lines of at most ``width``, continuations indented."""
    if len(line) <= width:
        return line
    import textwrap

    return "\n".join(textwrap.wrap(line, width, subsequent_indent="    ",
                                   break_on_hyphens=False, break_long_words=True))


def progress_line(trials: list[Trial], settings: ConsoleSettings,
                  ended: Optional[dict[str, str]] = None) -> str:
    """``3/8 done (2 completed, 1 failed), 2 running, 3 pending | best fvu 0.41 (trial abc)``.
    ``ended``: trial id -> state of trials known to have ended whose Tune status may lag."""
    ended = ended or {}
    counts: dict[str, int] = {}
    for t in trials:
        state = _state(t, ended)
        counts[state] = counts.get(state, 0) + 1
    done_kinds = ("completed", "stopped", "failed")
    done = sum(counts.get(k, 0) for k in done_kinds)
    running = counts.get("running", 0)
    pending = counts.get("pending", 0) + counts.get("paused", 0) + max(
        0, settings.num_samples - len(trials))
    detail = ", ".join(f"{counts[k]} {k}" for k in done_kinds if counts.get(k))
    line = (f"{done}/{max(settings.num_samples, len(trials))} done"
            + (f" ({detail})" if detail else "") + f", {running} running, {pending} pending")
    if settings.hooks:  # a suite: per-hook counts; a best across hooks would mean nothing
        from .suite import hook_progress

        states = {t.trial_id: _state(t, ended) for t in trials}
        return line + " | " + hook_progress(trials, states, settings.hooks,
                                            settings.samples_per_hook)
    best = best_so_far(trials, settings, ended)
    return line + (f" | {best}" if best else "")


def best_so_far(trials: list[Trial], settings: ConsoleSettings,
                ended: Optional[dict[str, str]] = None) -> str:
    """The best finished trial by the first objective metric (constraints applied), or the
    size of the Pareto front for a multi-metric objective; empty when nothing finished."""
    from .best import pareto_front
    from .sweep_config import ConstraintSpec

    objective = settings.metrics[:len(settings.modes)]
    rows = []
    for t in trials:
        result = t.last_result or {}
        if _state(t, ended or {}) not in ("completed", "stopped") or result.get("error"):
            continue
        if any(ConstraintSpec.from_dict(c).violation(_float(result.get(c["metric"]))) > 0
               for c in settings.constraints):
            continue
        if all(finite(result.get(m)) for m in objective):
            rows.append((t.trial_id, [float(result[m]) for m in objective]))
    if not rows:
        return ""
    if len(objective) > 1:
        import pandas as pd

        frame = pd.DataFrame([dict(zip(objective, v), trial_id=i) for i, v in rows])
        return f"Pareto front ({', '.join(objective)}): {len(pareto_front(frame, objective, settings.modes))} trial(s)"
    sign = 1.0 if settings.modes[0] == "min" else -1.0
    trial_id, values = min(rows, key=lambda r: sign * r[1][0])
    split = "" if objective[0].startswith("test_") else "val "
    return f"best {split}{objective[0]} {fmt_value(values[0])} (trial {trial_id})"


def _state(trial: Trial, ended: dict[str, str]) -> str:
    if trial.status in (Trial.RUNNING, Trial.PENDING) and trial.trial_id in ended:
        return ended[trial.trial_id]
    if trial.status == Trial.RUNNING:
        return "running"
    if trial.status == Trial.PENDING:
        return "pending"
    if trial.status == Trial.PAUSED:
        return "paused"
    if trial.status == Trial.ERROR:
        return "failed"
    result = trial.last_result or {}
    if result.get("error"):
        return "failed"
    return "completed" if result.get("final") else "stopped"


def _params(trial: Trial) -> str:
    config = trial.config or {}
    return " ".join(f"{k}={fmt_value(v)}" for k, v in config.items()
                    if v is None or isinstance(v, (bool, int, float, str)))


def _short_error(trial: Trial) -> str:
    from .results_callback import trial_error

    return trial_error(trial)


def _float(value: Any) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
