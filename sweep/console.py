"""What a sweep prints on the console: its format, its colour rule and its number format.

**The live view** (:class:`sweep.live_view.ConsoleCallback`, a Tune callback in the driver)
prints one line per trial event -- started (with its hyperparameters), resumed (from a
checkpoint, after a lost worker or a driver restart), reported (its key metrics: the first
report, then at most one line every ``report_every_s`` per trial), completed, stopped early,
failed (and why) -- and a short progress line after every finished trial (and at least every
``heartbeat_s``): trials done / running / pending, the best so far, the time elapsed. Lines go
through the ``sweep`` logger (logger ``sweep.console``), so they also land in the experiment's
log file. Ray's own output goes to that log file instead (:mod:`sweep.tune_output`); the
closing summary is :mod:`sweep.summary`.

**Colour**: ANSI colour only when the stream is a terminal (and ``NO_COLOR`` is unset); when
stdout/stderr is not a terminal Ray's coloured worker prefixes are turned off as well
(``RAY_COLOR_PREFIX=0``).

This module imports neither Ray nor the other console modules.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

logger = logging.getLogger("sweep.console")
_STYLES = {"green": "32", "red": "31", "yellow": "33", "cyan": "36", "bold": "1", "dim": "2"}


# -- formatting --------------------------------------------------------------------------------


class ConsoleFormatter(logging.Formatter):
    """The console's format: live-view lines (logger ``sweep.console``) as they are, other
    ``sweep`` lines after ``sae-sweep: ``; a record's ``style`` (``green``, ``red``...) becomes
    an ANSI colour only when ``stream`` is a terminal and ``NO_COLOR`` is unset."""

    def __init__(self, stream: Optional[IO[str]] = None):
        super().__init__("%(message)s")
        self.stream = stream

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not record.name.startswith(logger.name):
            text = f"sae-sweep: {text}"
        style = getattr(record, "style", None)
        if style in _STYLES and use_colour(self.stream):
            text = f"\x1b[{_STYLES[style]}m{text}\x1b[0m"
        return text


class PlainFormatter(logging.Formatter):
    """The log file's format: a timestamp, the logger and the message; never colour."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def use_colour(stream: Optional[IO[str]]) -> bool:
    """Whether ANSI colour codes may be written to ``stream`` (a terminal, NO_COLOR unset)."""
    if os.environ.get("NO_COLOR") or stream is None:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def configure_logging(*names: str) -> None:
    """Send the lines of the ``sweep`` logger (and of the loggers ``names``, e.g.
    ``activation_cache``) to stderr at INFO, once each, unless the application configured
    logging itself (then they propagate to its handlers)."""
    for name in ("sweep", *names):
        root = logging.getLogger(name)
        if not root.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(ConsoleFormatter(handler.stream))
            root.addHandler(handler)
            root.setLevel(logging.INFO)
            root.propagate = False  # Ray installs a root handler later: print each line once
    if not use_colour(sys.stdout) or not use_colour(sys.stderr):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def elapsed(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_value(value: Any) -> str:
    """A number as the console shows it (4 significant digits)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (not a bool, not None)."""
    try:
        return value is not None and not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# -- the live view -----------------------------------------------------------------------------


@dataclass
class ConsoleSettings:
    """What the live view needs to know about the sweep (plain data: Tune pickles callbacks)."""

    num_samples: int
    metrics: list[str]
    """Objective metrics (first = ranked), then constraint metrics, then ``fvu``/``l0``."""
    modes: list[str]
    """min/max of each objective metric."""
    constraints: list[dict] = field(default_factory=list)
    """The objective's constraints as ``{metric, min, max}`` dicts."""
    resumed: bool = False
    """The driver restored the sweep from Tune's state (``--resume``)."""
    report_every_s: float = 30.0
    heartbeat_s: float = 60.0
    hooks: list = field(default_factory=list)
    """A suite's hooks (per-hook progress on the progress line); empty for one hook."""
    samples_per_hook: int = 0

    @classmethod
    def from_sweep(cls, cfg: Any, *, resumed: bool = False) -> "ConsoleSettings":
        objective = cfg.objective
        shown = list(objective.metrics)
        shown += [c.metric for c in objective.constraints if c.metric not in shown]
        shown += [m for m in ("fvu", "l0") if m not in shown]
        hooks = list(cfg.hooks) if cfg.is_suite else []
        return cls(num_samples=int(cfg.num_samples) * max(1, len(hooks)), metrics=shown[:4],
                   modes=list(objective.modes),
                   constraints=[c.to_dict() for c in objective.constraints], resumed=resumed,
                   hooks=hooks, samples_per_hook=int(cfg.num_samples))


def display_path(path: str | Path, *, quote: bool = True) -> str:
    """``path`` as a command line shows it: relative to the working directory when it lies
    under it (shorter, and the same commands work from there), absolute otherwise; quoted for
    a POSIX shell where needed."""
    import shlex

    p = Path(path)
    try:
        shown = str(p.resolve().relative_to(Path.cwd().resolve())) if p.is_absolute() else str(p)
    except (ValueError, OSError):
        shown = str(p)
    return shlex.quote(shown or ".") if quote else shown or "."
