"""Where a run's wall time goes: named phases -> seconds (``PhaseTimer``).

One timer per training job (a sweep trial, ``sae-sweep train``). Code that does a distinct kind
of work wraps it in a named phase::

    with timed_phase("eval_test"):      # the active timer's phase; nothing when none is active
        record = evaluate_split(...)

Phases are **exclusive**: a phase entered inside another pauses the outer one until it ends
(the training loop is phase ``train``; a fine-tune step inside it is ``finetune``, a validation
record ``eval_val``, a checkpoint ``checkpoint``), so no second is counted twice and the phases
always sum to at most the wall time. A new kind of work (e.g. another evaluator) gets its own
results column by naming its phase; nothing here lists the names.

Phase names the project uses (``time_<name>_s`` columns):

* ``startup``     -- the job's own start: imports, configs, opening the cache, building sources
* ``model_load``  -- loading (and identity-checking) the cache's model for end-to-end work
* ``train``       -- local training steps (and the loop's reading of their batches)
* ``finetune``    -- end-to-end fine-tune steps of a two-phase run
* ``eval_val``    -- validation records during training and the final one
* ``eval_test``   -- the shipped SAE's figures on the test split
* ``eval_<kind>`` -- any other evaluation
* ``calibration`` -- fitting an inference threshold (each calibrated copy and the final one)
* ``checkpoint``  -- resumable checkpoints and the saved ``best/`` and ``final/`` SAEs
* ``report``      -- handing records (and checkpoints) to the reporter (Ray copies them)

:meth:`PhaseTimer.columns` gives those, plus ``time_eval_s`` (the sum of the ``eval_*``
phases), ``time_other_s`` (wall time in no phase) and ``time_wall_s`` (the whole run:
``time_wall_s`` = the phases + ``time_other_s``). (Not ``time_total_s``: Ray Tune reports a key
of that name itself.)
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import time
from typing import Any, Callable, Iterator, Mapping, Optional

WALL_COLUMN = "time_wall_s"
OTHER_COLUMN = "time_other_s"
EVAL_COLUMN = "time_eval_s"
TRAINING_PHASES = ("train", "finetune")
"""The phases that are training steps (the share a sweep's summary reports)."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_active: contextvars.ContextVar[Optional["PhaseTimer"]] = contextvars.ContextVar(
    "sae_sweep_phase_timer", default=None)


def phase_column(name: str) -> str:
    """The results column of phase ``name``: ``time_<name>_s``."""
    return f"time_{name}_s"


class PhaseTimer:
    """Exclusive named phases of one run (module docstring). ``clock`` returns seconds."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter,
                 started: Optional[float] = None):
        self._clock = clock
        self.started = clock() if started is None else started
        """When the run began, on ``clock`` (may be earlier than the timer: e.g. the process's
        start, so that imports before the timer existed count as wall time)."""
        self.seconds: dict[str, float] = {}
        """Seconds per phase so far (phases still open not included until they end)."""
        self.carried_wall = 0.0
        """Wall seconds of earlier attempts of the same run (a resumed trial), see restore."""
        self._stack: list[list[Any]] = []  # [name, when it last (re)started]

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` of phase ``name`` (measured elsewhere)."""
        if not _NAME.match(name):
            raise ValueError(f"phase name {name!r}: use lower-case letters, digits and _")
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, float(seconds))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``, pausing the enclosing phase meanwhile."""
        if not _NAME.match(name):
            raise ValueError(f"phase name {name!r}: use lower-case letters, digits and _")
        now = self._clock()
        if self._stack:
            outer = self._stack[-1]
            self.add(outer[0], now - outer[1])
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = self._clock()
            inner = self._stack.pop()
            self.add(inner[0], now - inner[1])
            if self._stack:
                self._stack[-1][1] = now

    @contextlib.contextmanager
    def activate(self) -> Iterator["PhaseTimer"]:
        """Make this the timer :func:`timed_phase` uses, in this thread/context."""
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)

    def wall_s(self) -> float:
        return self.carried_wall + max(0.0, self._clock() - self.started)

    def snapshot(self) -> dict[str, float]:
        """Seconds per phase now, the open phases counted up to now."""
        out = dict(self.seconds)
        now = self._clock()
        for entry in self._stack[-1:]:  # only the innermost open phase is running
            out[entry[0]] = out.get(entry[0], 0.0) + max(0.0, now - entry[1])
        return out

    def columns(self) -> dict[str, float]:
        """``time_<phase>_s`` per phase, ``time_eval_s``, ``time_other_s`` and ``time_wall_s``."""
        return time_columns(self.snapshot(), self.wall_s())

    def restore(self, columns: Mapping[str, Any]) -> None:
        """Continue from the ``columns()`` an earlier attempt of this run reported (a trial
        resumed from its checkpoint): its phases and wall time are added to this one's."""
        for key, value in columns.items():
            if key in (WALL_COLUMN, OTHER_COLUMN, EVAL_COLUMN):
                continue
            m = re.match(r"^time_([a-z][a-z0-9_]*)_s$", key)
            if m and isinstance(value, (int, float)):
                self.add(m.group(1), float(value))
        wall = columns.get(WALL_COLUMN)
        if isinstance(wall, (int, float)):
            self.carried_wall += float(wall)


def time_columns(seconds: Mapping[str, float], wall_s: float) -> dict[str, float]:
    """The results columns of ``seconds`` (phase -> s) in a run of ``wall_s`` seconds."""
    out = {phase_column(name): float(s) for name, s in sorted(seconds.items())}
    evals = [s for name, s in seconds.items() if name.startswith("eval_")]
    if evals:
        out[EVAL_COLUMN] = float(sum(evals))
    spent = float(sum(seconds.values()))
    wall = max(float(wall_s), spent)
    out[OTHER_COLUMN] = wall - spent
    out[WALL_COLUMN] = wall
    return out


def active_timer() -> Optional[PhaseTimer]:
    """The timer :meth:`PhaseTimer.activate` made current here, or None."""
    return _active.get()


def timed_phase(name: str) -> contextlib.AbstractContextManager:
    """The active timer's ``phase(name)``; a no-op context when no timer is active."""
    timer = _active.get()
    return timer.phase(name) if timer is not None else contextlib.nullcontext()

