"""One live driver per experiment: ``EXPERIMENT_DIR/driver.lock`` names the driver running it.

The lock is a small JSON record -- the driver's host, PID, the process's start time as the
kernel reports it, the machine's boot id, when it took the lock and its command line. A driver
takes it before it writes anything else into the folder (``sweep.json``, ``optuna.db``,
``sweep.log``, ``tune/``) and removes it when it ends, whatever the ending (normal, an error,
Ctrl-C). A driver killed with SIGKILL leaves it behind: a *stale* lock, taken over by the next
driver with one line saying so.

Taking it cannot race:

* the record is written to a temporary file first and then hard-linked to ``driver.lock``;
  ``link`` fails when ``driver.lock`` exists, so of two drivers started at the same moment
  exactly one wins, and nobody ever reads a half-written record (a filesystem without hard
  links falls back to ``O_CREAT | O_EXCL``);
* the whole check-and-take (read the lock, judge it, replace a stale one) runs under an
  exclusive ``fcntl.flock`` of ``.driver.lock.guard``, so two drivers taking over the same
  stale lock cannot both succeed.

Liveness of a lock written on this host: its PID is alive **and** the process with that PID is
the one that wrote it (same start time, same boot), which guards against PID reuse. A lock
written on another host cannot be checked from here: it is refused unless the caller passes
``take_over=True`` (``sae-sweep sweep --resume EXP --take-over``), after making sure that driver
is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from activation_cache import UserError

logger = logging.getLogger("sweep.lock")

LOCK_FILE = "driver.lock"
GUARD_FILE = ".driver.lock.guard"


class ExperimentLockedError(UserError, RuntimeError):
    """Another driver runs (or may run) this experiment."""


@dataclass(frozen=True)
class LockRecord:
    """Who holds an experiment's lock (the JSON in ``driver.lock``)."""

    host: str
    pid: int
    started: Optional[str]
    """The process's start time as the kernel reports it (``/proc/PID/stat`` field 22, or
    psutil's create time): a PID reused by another process has another start time."""
    boot_id: Optional[str]
    since: str
    """When it took the lock (local time, ISO 8601)."""
    command: str
    token: str

    def describe(self) -> str:
        """``host h, pid 123, since 2025-01-01 12:00:00``."""
        return f"host {self.host}, pid {self.pid}, since {self.since.replace('T', ' ')[:19]}"

    @classmethod
    def of_this_process(cls) -> "LockRecord":
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, started=process_start(pid),
                   boot_id=_boot_id(), since=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
                   token=uuid.uuid4().hex)


def liveness(record: LockRecord) -> str:
    """``"live"``, ``"dead"`` (the process is gone, or its PID now belongs to another
    process) or ``"unknown"`` (written on another host: cannot be checked from here)."""
    if record.host != socket.gethostname():
        return "unknown"
    boot = _boot_id()
    if record.boot_id and boot and record.boot_id != boot:
        return "dead"  # written before this machine rebooted
    if not _pid_alive(record.pid) or _is_zombie(record.pid):
        return "dead"
    started = process_start(record.pid)
    if record.started and started and record.started != started:
        return "dead"  # the PID was reused by another process
    return "live"


class DriverLock:
    """A held experiment lock (see the module docstring); release it with :meth:`release`
    (or use :func:`driver_lock`)."""

    def __init__(self, experiment_dir: Path, record: LockRecord, *,
                 replaced: Optional[LockRecord], replaced_why: str, created_dir: bool):
        self.experiment_dir = experiment_dir
        self.record = record
        self.replaced = replaced
        """The stale lock this one replaced (None when there was none)."""
        self.replaced_why = replaced_why
        self.created_dir = created_dir
        self._held = True

    @property
    def path(self) -> Path:
        return self.experiment_dir / LOCK_FILE

    def announce(self) -> None:
        """Say, in one line, that a stale lock was taken over (nothing when there was none)."""
        if self.replaced is not None:
            logger.warning("took over %s from a driver that %s (%s)", self.path,
                           self.replaced_why, self.replaced.describe())

    def release(self) -> None:
        """Remove the lock if it is still ours; remove the folder too when this lock created
        it and nothing else was written there."""
        if not self._held:
            return
        self._held = False
        with _guard(self.experiment_dir):
            held = read_lock(self.experiment_dir)
            if held is not None and held.token == self.record.token:
                _unlink(self.path)
            if self.created_dir:
                _remove_if_only_guard(self.experiment_dir)


def acquire(experiment_dir: str | Path, *, take_over: bool = False) -> DriverLock:
    """Take the lock of ``experiment_dir`` (created if missing) for this process.

    A live lock is refused with :class:`ExperimentLockedError` naming its driver; a stale one
    (its driver is gone) is replaced and reported in :attr:`DriverLock.replaced`; one written
    on another host is refused unless ``take_over``."""
    exp = Path(experiment_dir)
    created = not exp.exists()
    exp.mkdir(parents=True, exist_ok=True)
    me = LockRecord.of_this_process()
    tmp = exp / f".{LOCK_FILE}.{me.pid}.{me.token[:8]}.tmp"
    tmp.write_text(json.dumps(asdict(me)))
    try:
        with _guard(exp):
            for _ in range(5):
                if _create_exclusively(tmp, exp / LOCK_FILE):
                    return DriverLock(exp, me, replaced=None, replaced_why="",
                                      created_dir=created)
                held = read_lock(exp)
                if held is None:
                    if (exp / LOCK_FILE).exists():
                        # unreadable: a driver without hard links may be writing it right now
                        time.sleep(0.2)
                        held = read_lock(exp)
                        if held is None and (exp / LOCK_FILE).exists():
                            os.replace(tmp, exp / LOCK_FILE)
                            return DriverLock(exp, me, replaced=_unreadable(exp),
                                              replaced_why="left an unreadable lock",
                                              created_dir=created)
                    continue  # released in between: try again
                state = liveness(held)
                if state == "live":
                    raise ExperimentLockedError(
                        f"{exp}: a sweep driver is already running this experiment "
                        f"({held.describe()}); wait for it to end or stop it (kill "
                        f"{held.pid}) before starting or resuming it again")
                if state == "unknown" and not take_over:
                    raise ExperimentLockedError(
                        f"{exp}: locked by a sweep driver on another host ({held.describe()}), "
                        f"which cannot be checked from {socket.gethostname()}; if that driver "
                        "is gone, add --take-over (sae-sweep sweep --resume EXP --take-over)")
                os.replace(tmp, exp / LOCK_FILE)
                why = ("ran on another host (taken over with --take-over)" if state == "unknown"
                       else "is no longer running")
                return DriverLock(exp, me, replaced=held, replaced_why=why, created_dir=created)
            raise ExperimentLockedError(f"{exp}: could not take {LOCK_FILE} (it keeps changing)")
    except BaseException:
        _unlink(tmp)
        if created:
            _remove_if_only_guard(exp)
        raise
    finally:
        _unlink(tmp)


@contextlib.contextmanager
def driver_lock(experiment_dir: str | Path, *, take_over: bool = False) -> Iterator[DriverLock]:
    """:func:`acquire` for the duration of a ``with`` block (released however it ends)."""
    lock = acquire(experiment_dir, take_over=take_over)
    try:
        yield lock
    finally:
        lock.release()


def read_lock(experiment_dir: str | Path) -> Optional[LockRecord]:
    """The record in ``driver.lock`` (None when there is none or it cannot be read)."""
    try:
        data = json.loads((Path(experiment_dir) / LOCK_FILE).read_text())
        return LockRecord(**{k: data.get(k) for k in LockRecord.__dataclass_fields__})
    except (OSError, ValueError, TypeError, AttributeError):
        return None


@contextlib.contextmanager
def file_guard(path: str | Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` of ``path`` (created if missing) for a short critical
    section; a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _guard(exp: Path) -> contextlib.AbstractContextManager:
    return file_guard(exp / GUARD_FILE)


def _create_exclusively(tmp: Path, lock: Path) -> bool:
    """Make ``lock`` hold ``tmp``'s complete record if it does not exist; False if it does."""
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError as exc:  # no hard links here (some network filesystems)
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                             errno.EXDEV, errno.EMLINK):
            raise
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(tmp.read_text())
    return True


def _unreadable(exp: Path) -> LockRecord:
    return LockRecord(host="?", pid=-1, started=None, boot_id=None,
                      since=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(
                          (exp / LOCK_FILE).stat().st_mtime)), command="?", token="?")


def process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` as the kernel reports it (None when unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return "proc:" + stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime (ticks)
    except (OSError, IndexError):
        pass
    try:
        import psutil

        return f"psutil:{psutil.Process(pid).create_time():.3f}"
    except Exception:  # no psutil, or no such process
        return None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (OSError, IndexError):
        return False


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    except OSError:
        return False
    return True


def _remove_if_only_guard(exp: Path) -> None:
    """Remove a folder this process created for its lock when nothing else is in it."""
    try:
        if {p.name for p in exp.iterdir()} <= {GUARD_FILE}:
            _unlink(exp / GUARD_FILE)
            exp.rmdir()
    except OSError:
        pass


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
