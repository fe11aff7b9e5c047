"""Ray's output plumbing for one sweep, and the repairs of Tune's state a driver restores.

Everything here needs Ray Tune; the console's own format is :mod:`sweep.console` and the live
view (one line per trial event) is :mod:`sweep.live_view`; neither imports this module.

**Ray's output** (:func:`sweep_output`): by default Ray's status tables, Tune's INFO/WARNING
lines, Optuna's, Python warnings and the trials' own stdout/stderr (forwarded by Ray from the
worker processes) go to ``EXPERIMENT_DIR/sweep.log`` instead of the console; ``verbose=True``
(``sae-sweep sweep --verbose``) leaves them on the console, as Ray prints them (without Ray's
colour codes when the console is not a terminal). Tune runs at verbosity :data:`TUNE_VERBOSITY`
(its status table), which goes to the log file through :class:`LogFileReporter` unless verbose.

**Repairs of a killed driver's state** (:class:`CheckpointRepair`): checkpoints the dead driver
had already deleted are dropped from the restored bookkeeping when the trial starts.

**Interruption** (:class:`InterruptWatch`): whether Ctrl-C (SIGINT) or SIGUSR1 ended Tune's
run, and which trials were unfinished then, so the results table marks them ``interrupted``
(resumable) rather than ``stopped``, and the driver says so and prints the ``--resume`` command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from ray.tune import Callback, CLIReporter
from ray.tune.experiment import Trial

from .console import PlainFormatter, use_colour
from .results import LOG_FILE

ray_output_logger = logging.getLogger("sae_sweep.ray_output")
"""Ray's and the trials' own output: the log file only (never the console)."""

TUNE_VERBOSITY = 1
"""``RunConfig(verbose=...)``: Tune's status table (to the log file unless --verbose) and its
trial-level lines; our own live view replaces the rest."""


class SweepOutput:
    """Where Ray's output goes during one sweep (see :func:`sweep_output`)."""

    def __init__(self, log_path: Path, verbose: bool):
        self.log_path = log_path
        self.verbose = verbose
        self._undo: list[Any] = []

    def progress_reporter(self) -> Any:
        """``RunConfig(progress_reporter=...)``: None (Ray's own) with --verbose, else a
        reporter writing Tune's status table to the log file."""
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



def forget_missing_checkpoints(trial: Trial) -> list[str]:
    """Drop from the trial's checkpoint bookkeeping the checkpoints that no longer exist.

    A driver killed between deleting an old checkpoint (``checkpoints_to_keep``) and saving
    Tune's experiment state leaves that checkpoint listed in the state; the restored Tune would
    try to delete it again and log ``ERROR ... Error handling checkpoint ...
    FileNotFoundError`` although nothing is wrong. Called when a trial starts, before it can
    register a new checkpoint. Returns the paths dropped (Ray 2.60's ``_CheckpointManager``;
    a no-op when its layout differs)."""
    manager = getattr(getattr(trial, "run_metadata", None), "checkpoint_manager", None)
    results = getattr(manager, "_checkpoint_results", None)
    if not results:
        return []
    latest = getattr(manager, "latest_checkpoint_result", None)
    kept, gone = [], []
    for result in results:
        checkpoint = getattr(result, "checkpoint", None)
        if result is latest or checkpoint is None or _checkpoint_exists(checkpoint):
            kept.append(result)
        else:
            gone.append(str(checkpoint.path))
    if gone:
        manager._checkpoint_results = kept
    return gone


def _checkpoint_exists(checkpoint: Any) -> bool:
    import pyarrow.fs

    try:
        info = checkpoint.filesystem.get_file_info(checkpoint.path)
    except Exception:  # storage unreachable: keep it, Tune decides
        return True
    return info.type != pyarrow.fs.FileType.NotFound


class LogFileReporter(CLIReporter):
    """Tune's status table (a ``ray.tune.CLIReporter``), written to the sweep's log file at
    most once a minute instead of the console."""

    def __init__(self) -> None:
        super().__init__(max_report_frequency=60, print_intermediate_tables=True)

    def _print(self, msg: str) -> None:
        ray_output_logger.info("Tune status:\n%s", msg)


class CheckpointRepair(Callback):
    """Runs :func:`forget_missing_checkpoints` on every trial as it starts (before it can
    register a new checkpoint), and notes in the log what it dropped."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        forgotten = forget_missing_checkpoints(trial)
        if forgotten:
            ray_output_logger.info(
                "trial %s: %d checkpoint(s) recorded in Tune's state were already deleted "
                "before the driver restarted; dropped from its bookkeeping: %s",
                trial.trial_id, len(forgotten), ", ".join(forgotten))


class InterruptWatch(Callback):
    """Notes a Ctrl-C (SIGINT, or Tune's SIGUSR1) during ``Tuner.fit()``.

    Tune catches the first SIGINT itself: it stops the loop, saves its state (unfinished trials
    stay resumable), stops the trials and returns normally, so without this the driver cannot
    tell an interrupted sweep from a finished one. :meth:`setup` (which Tune calls after
    installing its handler) wraps that handler: the wrapper records the interruption and which
    trials were unfinished at that moment (:attr:`unfinished`), then calls Tune's handler.
    Use :meth:`around_fit` so the process's own handlers come back after the run."""

    _SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGUSR1", None))
                     if s is not None)

    def __init__(self) -> None:
        self._init_state()

    def _init_state(self) -> None:
        self.interrupted = False
        self.unfinished: set[str] = set()
        self._trials: list = []

    # Tune pickles its callbacks with the experiment state: nothing of this run is kept
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._init_state()

    def setup(self, **info: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self._SIGNALS:
            inner = signal.getsignal(sig)
            if callable(inner):
                signal.signal(sig, self._wrap(inner))

    def _wrap(self, inner: Any) -> Any:
        def handler(signum: int, frame: Any) -> None:
            self.note_interrupt()
            inner(signum, frame)

        return handler

    def note_interrupt(self) -> None:
        """Record an interruption now (also for a KeyboardInterrupt the driver caught)."""
        if not self.interrupted:
            self.interrupted = True
            self.unfinished = {t.trial_id for t in self._trials
                               if t.status in (Trial.RUNNING, Trial.PENDING, Trial.PAUSED)}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._trials = trials

    @contextlib.contextmanager
    def around_fit(self) -> Iterator["InterruptWatch"]:
        """Restore the signal handlers of before ``Tuner.fit()`` afterwards (Tune leaves its
        own installed); a KeyboardInterrupt raised out of the run is noted, then re-raised."""
        saved = {}
        if threading.current_thread() is threading.main_thread():
            saved = {sig: signal.getsignal(sig) for sig in self._SIGNALS}
        try:
            yield self
        except KeyboardInterrupt:
            self.note_interrupt()
            raise
        finally:
            for sig, handler in saved.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)
