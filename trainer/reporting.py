"""The one logging seam of training: the ``Reporter`` protocol and the default ``ConsoleReporter``.

The training loop never prints. It tells its reporter when training starts, after every step
(for a progress bar), every MetricsRecord (with the checkpoint folder written at that step, if
any) and free-text messages. The sweep's Ray reporter wraps the same calls in
``ray.tune.report(metrics, checkpoint=Checkpoint.from_directory(...))``.

``ConsoleReporter`` shows a tqdm bar on a terminal (its lines written above the bar, never glued
onto it); when its stream is not a terminal (a log file) progress becomes a plain line every 10 %
of the steps or 30 s (``activation_cache.progress_bar``), with no carriage return or cursor code.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import IO, Any, Optional, Protocol, runtime_checkable

from activation_cache import progress_bar

from .metrics import MetricsRecord


@runtime_checkable
class Reporter(Protocol):
    def on_train_start(self, *, total_steps: int, start_step: int, description: str) -> None:
        """Training begins (or resumes at ``start_step``) and will run to ``total_steps``."""

    def on_step(self, step: int) -> None:
        """Optimizer step ``step`` (1-based) finished. Must be cheap."""

    def on_metrics(self, record: MetricsRecord, checkpoint_dir: Optional[str]) -> None:
        """An evaluation; ``checkpoint_dir`` is the checkpoint written at this step, if any."""

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_message(self, text: str) -> None:
        """A human-readable note (initialisation, threshold calibration, resume...)."""

    def on_train_end(self, result: Any) -> None:
        """Training finished; ``result`` is the TrainResult."""


LINE_WIDTH = 120
"""Console lines are wrapped at this width (at ``|`` boundaries), so a log file stays readable."""


def wrap_fields(parts: list[str], width: int = LINE_WIDTH, indent: str = "    ") -> str:
    """``parts`` joined by `` | ``, continued on indented lines where a line would pass
    ``width`` characters."""
    lines = [parts[0]] if parts else [""]
    for part in parts[1:]:
        if len(lines[-1]) + 3 + len(part) > width:
            lines.append(indent + part)
        else:
            lines[-1] += " | " + part
    return "\n".join(lines)


def wrap_text(text: str, width: int = LINE_WIDTH, indent: str = "    ") -> str:
    """Each line of ``text`` longer than ``width`` broken at spaces (words, paths kept whole)
    into indented continuation lines."""
    out = []
    for line in text.splitlines() or [""]:
        if len(line) <= width:
            out.append(line)
            continue
        lead = line[:len(line) - len(line.lstrip())]
        out.extend(textwrap.wrap(line, width=width, subsequent_indent=lead + indent,
                                 break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)


def format_record(record: MetricsRecord, checkpoint: Optional[str] = None) -> str:
    """A MetricsRecord in a line (two when it has many figures), with the checkpoint's name."""
    parts = [f"step {record.step}", f"tokens {record.tokens_seen:,}"]
    for name, label, fmt in (("loss", "loss", ".4g"), ("explained_variance", "ev", ".4f"),
                             ("mse", "mse", ".4g"), ("l0", "l0", ".1f"),
                             ("l0_train", "l0_train", ".1f"), ("dead_fraction", "dead", ".3f"),
                             ("dense_fraction", "dense", ".3f"), ("kl_div", "kl", ".4g"),
                             ("ce_loss_score", "ce_score", ".4f")):
        value = getattr(record, name)
        if value is not None:
            parts.append(f"{label} {value:{fmt}}")
    if checkpoint:  # its name: the folder is OUT/checkpoints, said at the end
        parts.append(f"checkpoint {Path(checkpoint).name}")
    return wrap_fields(parts)


class ConsoleReporter:
    """Progress (a bar on a terminal, periodic lines otherwise) plus one line per MetricsRecord
    (to stderr by default)."""

    def __init__(self, *, show_progress: bool = True, stream: Optional[IO[str]] = None,
                 print_metrics: bool = True):
        self.show_progress = show_progress
        self.stream = stream if stream is not None else sys.stderr
        self.print_metrics = print_metrics
        self._bar: Any = None
        self.records: list[MetricsRecord] = []

    def _write(self, text: str) -> None:
        text = wrap_text(text)
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_train_start(self, *, total_steps: int, start_step: int, description: str) -> None:
        if self.show_progress:
            self._bar = progress_bar(total_steps, initial=start_step, desc=description,
                                     unit="step", stream=self.stream, emit=self._print)

    def on_step(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def on_metrics(self, record: MetricsRecord, checkpoint_dir: Optional[str]) -> None:
        self.records.append(record)
        if self._bar is not None and record.explained_variance is not None:
            l0 = record.l0 if record.l0 is not None else (record.l0_train or 0)
            self._bar.set_postfix(ev=f"{record.explained_variance:.3f}", l0=f"{l0:.1f}",
                                  refresh=False)
        if self.print_metrics:
            self._write(format_record(record, checkpoint_dir))

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_message(self, text: str) -> None:
        self._write(text)

    def on_train_end(self, result: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
