"""The one logging seam of training: the ``Reporter`` protocol and the default ``ConsoleReporter``.

The training loop never prints. It tells its reporter when training starts, after every step
(for a progress bar), every MetricsRecord (with the checkpoint folder written at that step, if
any) and free-text messages. The sweep's Ray reporter wraps the same calls in
``ray.tune.report(metrics, checkpoint=Checkpoint.from_directory(...))``.
"""

from __future__ import annotations

import sys
from typing import IO, Any, Optional, Protocol, runtime_checkable

from tqdm.auto import tqdm

from .metrics import MetricsRecord


@runtime_checkable
class Reporter(Protocol):
    def on_train_start(self, *, total_steps: int, start_step: int, description: str) -> None:
        """Training begins (or resumes at ``start_step``) and will run to ``total_steps``."""

    def on_step(self, step: int) -> None:
        """Optimizer step ``step`` (1-based) finished. Must be cheap."""

    def on_metrics(self, record: MetricsRecord, checkpoint_dir: Optional[str]) -> None:
        """An evaluation; ``checkpoint_dir`` is the checkpoint written at this step, if any."""

    def on_message(self, text: str) -> None:
        """A human-readable note (initialisation, threshold calibration, resume...)."""

    def on_train_end(self, result: Any) -> None:
        """Training finished; ``result`` is the TrainResult."""


def format_record(record: MetricsRecord) -> str:
    """One line summarising a MetricsRecord."""
    parts = [f"step {record.step}", f"tokens {record.tokens_seen:,}"]
    for name, label, fmt in (("loss", "loss", ".4g"), ("explained_variance", "ev", ".4f"),
                             ("mse", "mse", ".4g"), ("l0", "l0", ".1f"),
                             ("l0_train", "l0_train", ".1f"), ("dead_fraction", "dead", ".3f"),
                             ("dense_fraction", "dense", ".3f"), ("kl_div", "kl", ".4g"),
                             ("ce_loss_score", "ce_score", ".4f")):
        value = getattr(record, name)
        if value is not None:
            parts.append(f"{label} {value:{fmt}}")
    return " | ".join(parts)


class ConsoleReporter:
    """A tqdm progress bar plus one line per MetricsRecord (to stderr by default)."""

    def __init__(self, *, show_progress: bool = True, stream: Optional[IO[str]] = None,
                 print_metrics: bool = True):
        self.show_progress = show_progress
        self.stream = stream if stream is not None else sys.stderr
        self.print_metrics = print_metrics
        self._bar: Optional[tqdm] = None
        self.records: list[MetricsRecord] = []

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream)

    def on_train_start(self, *, total_steps: int, start_step: int, description: str) -> None:
        if self.show_progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc=description,
                             unit="step", file=self.stream, dynamic_ncols=True)

    def on_step(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def on_metrics(self, record: MetricsRecord, checkpoint_dir: Optional[str]) -> None:
        self.records.append(record)
        if self._bar is not None and record.explained_variance is not None:
            self._bar.set_postfix(ev=f"{record.explained_variance:.3f}",
                                  l0=f"{record.l0 if record.l0 is not None else (record.l0_train or 0):.1f}", refresh=False)
        if self.print_metrics:
            line = format_record(record)
            if checkpoint_dir:
                line += f" | checkpoint {checkpoint_dir}"
            self._write(line)

    def on_message(self, text: str) -> None:
        self._write(text)

    def on_train_end(self, result: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
