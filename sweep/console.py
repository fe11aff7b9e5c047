"""What a sweep prints: a compact live view on the console, Ray's own output in a log file.

**The live view** (:class:`sweep.live_view.ConsoleCallback`, a Tune callback in the driver) prints one line per
trial event -- started (with its hyperparameters), resumed (from a checkpoint, after a lost
worker or a driver restart), reported (its key metrics: the first report, then at most one
line every ``report_every_s`` per trial), completed, stopped early, failed (and why) -- and a
short progress line after every finished trial (and at least every ``heartbeat_s``): trials
done / running / pending, the best so far, the time elapsed. Lines go through the ``sweep``
logger (logger ``sweep.console``), so they also land in the experiment's log file.

**Ray's output** (:func:`sweep_output`): by default Ray's status tables, Tune's INFO/WARNING
lines, Optuna's, Python warnings and the trials' own stdout/stderr (forwarded by Ray from the
worker processes) go to ``EXPERIMENT_DIR/sweep.log`` instead of the console; ``verbose=True``
(``sae-sweep sweep --verbose``) leaves them on the console, as Ray prints them.

**Colour**: ANSI colour only when the stream is a terminal (and ``NO_COLOR`` is unset); when
stdout/stderr is not a terminal Ray's coloured worker prefixes are turned off as well
(``RAY_COLOR_PREFIX=0``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Optional

logger = logging.getLogger("sweep.console")
ray_output_logger = logging.getLogger("sae_sweep.ray_output")
"""Ray's and the trials' own output: the log file only (never the console)."""

LOG_FILE = "sweep.log"

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

    @classmethod
    def from_sweep(cls, cfg: Any, *, resumed: bool = False) -> "ConsoleSettings":
        objective = cfg.objective
        shown = list(objective.metrics)
        shown += [c.metric for c in objective.constraints if c.metric not in shown]
        shown += [m for m in ("fvu", "l0") if m not in shown]
        return cls(num_samples=int(cfg.num_samples), metrics=shown[:4],
                   modes=list(objective.modes),
                   constraints=[c.to_dict() for c in objective.constraints], resumed=resumed)


# -- Ray's output --------------------------------------------------------------------------------


class SweepOutput:
    """Where Ray's output goes during one sweep (see :func:`sweep_output`)."""

    def __init__(self, log_path: Path, verbose: bool):
        self.log_path = log_path
        self.verbose = verbose
        self._undo: list[Any] = []

    @property
    def tune_verbose(self) -> int:
        """``RunConfig(verbose=...)``: Ray's default detail with --verbose, its status table
        only (to the log file) otherwise."""
        return 1

    def progress_reporter(self) -> Any:
        """``RunConfig(progress_reporter=...)``: None (Ray's own) with --verbose, else a
        reporter writing Tune's status table to the log file."""
        from .live_view import LogFileReporter

        return None if self.verbose else LogFileReporter()

    def capture_worker_output(self) -> None:
        """After ``ray.init(log_to_driver=True)``: the trials' stdout/stderr that Ray forwards
        to the driver go to the log file instead of the console; with --verbose they stay on
        the console, without Ray's colour codes when it is not a terminal."""
        if self.verbose and use_colour(sys.stdout) and use_colour(sys.stderr):
            return  # Ray's own printing, coloured prefixes and all
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # pragma: no cover - another Ray layout: leave Ray's printing
            return
        if not any(name == "ray_print_logs" for name, _ in getattr(dispatcher, "handlers", [])):
            return
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("sae_sweep_worker_output",
                               _print_worker_lines if self.verbose else _log_worker_lines)
        self._undo.append(lambda: dispatcher.remove_handler("sae_sweep_worker_output"))

    @contextlib.contextmanager
    def tune_run(self) -> Iterator[None]:
        """Around ``Tuner.fit()``: without --verbose, Tune's classic reporting path (whose
        progress reporter can be pointed at a file) instead of the new console output."""
        if self.verbose:
            yield
            return
        before = os.environ.get("RAY_AIR_NEW_OUTPUT")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = before

    def close(self) -> None:
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception:  # pragma: no cover - best effort
                pass
        self._undo.clear()


def _worker_prefix(data: dict) -> str:
    """``(train_trial pid=123)`` for a batch of worker output forwarded by Ray (a dict with
    ``lines``, ``pid``, ``ip``, ``is_err``, ``actor_name``/``task_name``)."""
    who = data.get("actor_name") or data.get("task_name")
    pid = data.get("pid")
    return f"({who} pid={pid})" if who else f"(pid={pid})" if str(pid).isdigit() else f"({pid})"


def _log_worker_lines(data: dict) -> None:
    prefix = _worker_prefix(data)
    for line in data.get("lines", []):
        ray_output_logger.info("%s %s", prefix, line)


def _print_worker_lines(data: dict) -> None:
    prefix = _worker_prefix(data)
    stream = sys.stderr if data.get("is_err") else sys.stdout
    for line in data.get("lines", []):
        print(f"{prefix} {line}", file=stream, flush=True)


class _Forward(logging.Handler):
    """Hands records to another handler (so that whoever re-formats this one -- ray.init does
    -- leaves the shared file handler's format alone)."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


@contextlib.contextmanager
def sweep_output(experiment_dir: Path, *, verbose: bool = False) -> Iterator[SweepOutput]:
    """Route the driver's output for one sweep (see the module docstring).

    Our own lines (``sweep`` loggers) go to the console and to ``EXPERIMENT_DIR/sweep.log``;
    without ``verbose``, Ray's loggers, Optuna's, Python warnings and (after
    :meth:`SweepOutput.capture_worker_output`) the trials' output go to the log file only.
    Everything is restored on exit."""
    experiment_dir.mkdir(parents=True, exist_ok=True)
    log_path = experiment_dir / LOG_FILE
    handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    handler.setFormatter(PlainFormatter())
    out = SweepOutput(log_path, verbose)
    restore: list[Any] = []

    def attach(name: str, *, exclusive: bool, level: Optional[int] = None,
               handler: logging.Handler = handler) -> None:
        lg = logging.getLogger(name)
        saved = (list(lg.handlers), lg.propagate, lg.level)
        if exclusive:
            lg.handlers = [handler]
            lg.propagate = False
        else:
            lg.addHandler(handler)
        if level is not None:
            lg.setLevel(level)
        restore.append(lambda: (setattr(lg, "handlers", saved[0]),
                                setattr(lg, "propagate", saved[1]), lg.setLevel(saved[2])))

    attach("sweep", exclusive=False)
    attach(ray_output_logger.name, exclusive=True, level=logging.INFO)
    saved_showwarning = warnings.showwarning
    if not verbose:
        import optuna

        optuna.logging.get_logger("optuna")  # installs Optuna's own handler now, replaced here
        # Ray configured its logger at import; ray.init re-formats the handlers it finds on it
        attach("ray", exclusive=True, handler=_Forward(handler))
        attach("optuna", exclusive=True)

        def showwarning(message: Any, category: Any, filename: str, lineno: int,
                        file: Any = None, line: Optional[str] = None) -> None:
            ray_output_logger.warning("%s", warnings.formatwarning(message, category, filename,
                                                                   lineno, line).rstrip())

        warnings.showwarning = showwarning
    ray_output_logger.info("---- sae-sweep %s (pid %d) ----", " ".join(sys.argv[1:]) or "sweep",
                           os.getpid())
    try:
        yield out
    finally:
        out.close()
        warnings.showwarning = saved_showwarning
        for undo in reversed(restore):
            undo()
        handler.close()


# -- the end of a sweep ------------------------------------------------------------------------


def summarize_sweep(experiment_dir: str | Path, *, top: int = 5) -> str:
    """What the CLI prints after a sweep: the best trials and the exact next commands."""
    from .best import format_table, select_best
    from .results import load_results, load_sweep_info

    exp = Path(experiment_dir)
    frame = load_results(exp)
    info = load_sweep_info(exp)
    cfg = info.get("config", {})
    objective = cfg.get("objective", {})
    best = select_best(frame, objective=objective, top=top)
    q = shlex.quote(str(exp))
    metric = objective.get("metric", "fvu")
    mode = objective.get("mode", "min")
    what = (f"{mode} {metric}" if isinstance(metric, str)
            else ", ".join(f"{o} {m}" for m, o in zip(metric, mode)))
    constraints = [_constraint_text(c) for c in objective.get("constraints") or []]
    lines = [f"results: {exp / 'results.parquet'} ({len(frame)} trials); Ray's log: "
             f"{exp / LOG_FILE}",
             f"best trials ({what}" + (f", {' and '.join(constraints)}" if constraints else "")
             + "):"]
    lines.append(format_table(best, "table") if len(best) and "trial_id" in best else
                 "(no finished trial with a finite objective value)")
    storage = cfg.get("optuna_storage") or f"sqlite:///{(exp / 'optuna.db').resolve()}"
    lines += [
        "next:",
        f"  sae-sweep best {q} --top 10",
        f"  sae-sweep export {q} --trial best --out {shlex.quote(str(exp / 'best-sae'))}",
        f"  sae-sweep report {q}",
        f"  optuna-dashboard {shlex.quote(storage)}   # pip install optuna-dashboard",
    ]
    return "\n".join(lines)


def _constraint_text(constraint: dict) -> str:
    parts = []
    if constraint.get("min") is not None:
        parts.append(f"{constraint['metric']} >= {fmt_value(constraint['min'])}")
    if constraint.get("max") is not None:
        parts.append(f"{constraint['metric']} <= {fmt_value(constraint['max'])}")
    return " and ".join(parts)
