"""Progress of long work, fit for a terminal and for a log file alike.

:func:`progress_bar` gives a tqdm bar when its stream is a terminal, and otherwise (output
redirected to a file, a cluster job's log) a :class:`LineProgress`: plain lines, one every 10 %
of the work or every 30 s, whichever comes first, plus one at the end -- no carriage returns,
no cursor codes, no bar characters. Both have the same small interface: ``update(n)``, ``n``,
``set_postfix(**values)``, ``write(text)``, ``close()`` and use as a context manager.

Every progress display of the packages goes through here (the cache build, tokenization, the
trainer's console reporter), so no bar is written to a file.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Callable, Optional


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _count(value: float, unit_scale: bool) -> str:
    if not unit_scale or abs(value) < 1000:
        return f"{value:,.0f}"
    for unit in ("k", "M", "G"):
        value /= 1000
        if abs(value) < 1000 or unit == "G":
            return f"{value:.1f}{unit}"
    return f"{value:.1f}G"  # pragma: no cover


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """Progress as plain lines (see the module docstring), each passed to ``emit``:

        caching activations: 9.5k/18.9k tok (50%), 3,015 tok/s, 0:03 elapsed, ~0:03 left
    """

    def __init__(self, total: Optional[float], *, desc: str = "", unit: str = "it",
                 initial: float = 0, unit_scale: bool = False,
                 emit: Callable[[str], None], every_fraction: float = 0.1,
                 every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = initial
        self.emit = emit
        self.every_fraction, self.every_s, self.clock = every_fraction, every_s, clock
        self.start = self.clock()
        self._start_n = initial
        self._last_t = self.start
        self._last_n = initial
        self._postfix = ""
        self._closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        step = (self.total or 0) * self.every_fraction
        due_fraction = bool(self.total) and self.n - self._last_n >= step > 0
        if due_fraction or now - self._last_t >= self.every_s:
            self._line(now)

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str, file: Any = None) -> None:
        self.emit(text)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else None
        parts = [f"{_count(self.n, self.unit_scale)}"
                 + (f"/{_count(self.total, self.unit_scale)}" if self.total else "")
                 + f" {self.unit}"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if rate:
            parts.append(f"{rate:,.0f} {self.unit}/s" if rate >= 10 else
                         f"{rate:.2g} {self.unit}/s")
        parts.append(f"{_clock(elapsed)} elapsed")
        if rate and self.total and self.n < self.total:
            parts.append(f"~{_clock((self.total - self.n) / rate)} left")
        text = (f"{self.desc}: " if self.desc else "") + ", ".join(parts)
        if self._postfix:
            text += f" | {self._postfix}"
        self.emit(text)
        self._last_t, self._last_n = now, self.n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n != self._last_n:
            self._line(self.clock())

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _NoProgress:
    """What a disabled progress display is: every call does nothing (``write`` still emits)."""

    def __init__(self, initial: float, emit: Callable[[str], None]):
        self.n = initial
        self.emit = emit

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        pass

    def write(self, text: str, file: Any = None) -> None:
        self.emit(text)

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(total: Optional[float], *, desc: str = "", unit: str = "it", initial: float = 0,
                 unit_scale: bool = False, stream: Optional[IO[str]] = None,
                 emit: Optional[Callable[[str], None]] = None, disable: bool = False,
                 lines_off_terminal: bool = True, leave: bool = True) -> Any:
    """A progress display for ``total`` units of work on ``stream`` (default stderr).

    A terminal gets a tqdm bar; anything else gets :class:`LineProgress` lines passed to
    ``emit`` (default: written to ``stream``), or nothing with ``lines_off_terminal=False``
    (e.g. a short nested display). ``disable``: nothing at all."""
    stream = stream if stream is not None else sys.stderr

    def write_line(text: str) -> None:
        print(text, file=stream, flush=True)

    emit = emit or write_line
    if disable:
        return _NoProgress(initial, emit)
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                    file=stream, dynamic_ncols=True, leave=leave)
    if not lines_off_terminal:
        return _NoProgress(initial, emit)
    return LineProgress(total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                        emit=emit)
