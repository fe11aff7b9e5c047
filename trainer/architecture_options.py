"""ArchitectureOptions: the base of an architecture's own config fields.

Each architecture declares its fields (loss coefficients, ``top_k``, threshold rules, group
sizes...) as an ``ArchitectureOptions`` dataclass in its own file under ``trainer/saes/``. This
module stands alone: it imports neither the registry nor the SAE base nor ``SAEConfig``, so an
options class can be defined, validated and shared (``saes/auxk.py``'s ``KSparseOptions``,
``saes/threshold.py``'s ``ThresholdOptions``) without importing any architecture.

``SAEConfig`` (trainer/sae_config.py) holds one options object; the registry (trainer/registry.py)
turns the flat YAML keys of an ``sae:`` block into the common fields and the options of the
architecture they name.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from activation_cache import ConfigError, StrictConfig


@dataclass
class ArchitectureOptions(StrictConfig):
    """Base of an architecture's own config fields (one dataclass per architecture).

    Subclasses declare their fields with docstrings, validate them in ``validate`` (alone) and
    in :meth:`check` (against the common fields of the ``SAEConfig``, e.g. ``top_k <= d_sae``),
    and say how the sweep may search them: every int/float field is searchable;
    ``width_capped`` maps a field to the offset below ``d_sae`` the define-by-run space caps it
    at (``top_k`` < d_sae). ``transcodes`` is true for architectures whose output side is a
    different hook than their input (transcoders): only they accept ``hook_name_out`` /
    ``d_out`` different from the input's.
    """

    width_capped: ClassVar[dict[str, int]] = {}
    transcodes: ClassVar[bool] = False

    def check(self, cfg: Any) -> None:
        """Validate against the common fields (``cfg.d_in``, ``cfg.d_sae``...)."""

    def derived_values(self) -> dict[str, Any]:
        """Fields whose value is derived from others while left unset (``to_dict`` omits them
        while they still equal this)."""
        return {}

    def _fail(self, field: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"SAEConfig.{field}: {message}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def searchable_fields(cls) -> tuple[str, ...]:
        """Fields a sweep may search (numeric scalars)."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            hint = hints.get(f.name)
            args = set(typing.get_args(hint)) - {type(None)}
            if hint in (int, float) or (args and args <= {int, float}):
                out.append(f.name)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name, value in self.derived_values().items():
            if out.get(name) == value:
                del out[name]
        return out


def require_number(options: ArchitectureOptions, name: str, *, low: float = 0.0,
                   strict: bool = False, high: float | None = None,
                   high_strict: bool = False) -> None:
    """Raise a one-line ConfigError unless ``options.<name>`` is a finite number in the range
    (``low`` <= or < value, value <= or < ``high``)."""
    import math

    value = getattr(options, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low)
    if high is not None:
        ok = ok and (value < high if high_strict else value <= high)
    if not ok:
        lo = f"> {low:g}" if strict else f">= {low:g}"
        hi = "" if high is None else f" and {'<' if high_strict else '<='} {high:g}"
        options._fail(name, f"must be a number {lo}{hi}, got {value!r}")


def require_int(options: ArchitectureOptions, name: str, *, low: int = 0) -> None:
    """Raise a one-line ConfigError unless ``options.<name>`` is an integer >= ``low``."""
    value = getattr(options, name)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        options._fail(name, f"must be an integer >= {low}, got {value!r}")
