"""Where an SAE trains: resolving a device spec, and moving cached batches onto the device.

``resolve_device(spec)`` turns ``auto | cpu | cuda | cuda:N`` into a ``torch.device``:
``auto`` is the first GPU this process sees when CUDA is available, else the CPU. Inside a Ray
trial the process sees only the GPU Ray assigned to it (Ray sets ``CUDA_VISIBLE_DEVICES`` per
worker; several trials share one GPU with fractional ``resources_per_trial.gpu``), so ``auto``
and ``cuda`` are that GPU. Asking for CUDA where there is none, or for an index the process
does not see, is a one-line :class:`~activation_cache.ConfigError`.

``to_device(batch, device, dtype)`` moves a batch as the cache stored it (fp16/bf16: half the
bytes of fp32) and converts it on the device. A batch in pinned memory (the cache reader's
``token_source(..., dtype=None, pin_memory=True)``) is copied asynchronously
(``non_blocking``), so the copy overlaps with the GPU's work on the previous batch; torch's
pinned-memory allocator keeps the host memory alive until the copy has run.
"""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor

from activation_cache import ConfigError

_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def _parse(spec: object) -> tuple[str, str | None] | None:
    """``(kind, index)`` of a device spec, or None when it is not one."""
    if not isinstance(spec, (str, torch.device)):
        return None
    match = _SPEC.match(str(spec).strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        return None
    return match.group(1), match.group(2)


def is_device_spec(spec: object) -> bool:
    """Whether ``spec`` is a device spec ``resolve_device`` understands (checked without
    looking for CUDA, so a config written on a GPU machine validates on a CPU one)."""
    return _parse(spec) is not None


def resolve_device(spec: str | torch.device = "auto", *, field: str = "device") -> torch.device:
    """The torch device of ``spec`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``).

    ``field`` names the setting in error messages (e.g. ``"SAEConfig.device"``).
    """
    parsed = _parse(spec)
    if parsed is None:
        raise ConfigError(f"{field}: {spec!r} is not a device; use 'auto', 'cpu', 'cuda' or "
                          "'cuda:N'")
    kind, index = parsed
    if kind == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if kind == "auto":
        return torch.device("cuda" if available else "cpu")
    if not available:
        raise ConfigError(f"{field}: {spec!r} but CUDA is not available here "
                          f"({_why_no_cuda()}); use 'cpu' or 'auto'")
    if index is None:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise ConfigError(f"{field}: {spec!r} but this process sees {count} CUDA device(s) "
                          f"(cuda:0..cuda:{count - 1}{_visible()}); use 'cuda' or 'auto'")
    return torch.device("cuda", int(index))


def to_device(batch: Tensor, device: torch.device | str,
              dtype: torch.dtype | None = torch.float32) -> Tensor:
    """``batch`` on ``device`` as ``dtype`` (None: keep its dtype), converted on the device.

    Pinned CPU batches travel to a GPU with a non-blocking copy; other batches with a plain
    copy (pinning them here would cost one more host copy than it saves). On the CPU this is
    only the conversion.
    """
    device = torch.device(device)
    if device.type != "cpu" and batch.device.type == "cpu":
        batch = batch.to(device, non_blocking=batch.is_pinned())
    elif batch.device != device:
        batch = batch.to(device)
    return batch if dtype is None or batch.dtype == dtype else batch.to(dtype)


def _why_no_cuda() -> str:
    if not torch.backends.cuda.is_built():
        return f"this torch {torch.__version__} is built without CUDA"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty: no GPU was assigned to this process"
    return "no CUDA device or driver found"


def _visible() -> str:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"; CUDA_VISIBLE_DEVICES={env}" if env is not None else ""
