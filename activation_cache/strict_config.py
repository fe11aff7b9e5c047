"""Strict, round-trippable configuration dataclasses shared by every sae-sweep config.

Every config in the project (cache, SAE, training, sweep) subclasses :class:`StrictConfig`:

* validation runs at construction (``__post_init__`` calls :meth:`validate`), and every error
  names the offending field: ``ConfigError("SAEConfig.top_k: must be in [1, d_sae=512], got 0")``;
* ``from_dict`` rejects unknown keys with a message that names them (and suggests the closest
  known field), converts nested dicts into nested configs and lists into tuples where the field
  is annotated so;
* ``to_dict`` / ``from_dict`` and ``to_yaml`` / ``from_yaml`` round-trip exactly.

It lives in activation_cache because that is the root of the data flow: trainer and sweep may
import activation_cache's public API, never the reverse.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from .errors import UserError

T = TypeVar("T", bound="StrictConfig")


def is_int(value: object) -> bool:
    """True for a Python int that is not a bool (``True`` is an int to ``isinstance``)."""
    return isinstance(value, int) and not isinstance(value, bool)


class ConfigError(UserError, ValueError):
    """A configuration value or file is invalid. The message names the field and the fix."""


class StrictConfig:
    """Mixin for ``@dataclass`` configs: strict from_dict, to_dict, YAML and validation."""

    # -- validation -----------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        """Raise :class:`ConfigError` naming the field when a value is invalid."""

    def _fail(self, field: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{type(self).__name__}.{field}: {message}")

    def _require(self, condition: bool, field: str, message: str) -> None:
        if not condition:
            self._fail(field, message)

    # -- dict round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _to_plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = [k for k in data if k not in fields]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), list(fields), n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {', '.join(hints)}; "
                f"known keys are: {', '.join(sorted(fields))}"
            )
        hints_by_name = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            kwargs[name] = _from_plain(hints_by_name.get(name), value, f"{cls.__name__}.{name}")
        try:
            return cls(**kwargs)
        except TypeError as exc:  # e.g. a required field is missing
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    # -- YAML --------------------------------------------------------------------------------
    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls: type[T], path_or_text: str | Path) -> T:
        text, where = _read_yaml_text(path_or_text)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            # one line (the CLI prints one): the problem and where, not PyYAML's excerpt
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def replace(self: T, **changes: Any) -> T:
        """A validated copy with some fields changed."""
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)


def _read_yaml_text(path_or_text: str | Path) -> tuple[str, str]:
    p = Path(path_or_text)
    if isinstance(path_or_text, Path) or (
        "\n" not in str(path_or_text) and str(path_or_text).endswith((".yaml", ".yml", ".json"))
    ):
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        return p.read_text(), str(p)
    return str(path_or_text), "<yaml text>"


def _to_plain(value: Any) -> Any:
    if isinstance(value, StrictConfig):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _from_plain(hint: Any, value: Any, where: str) -> Any:
    """Convert a plain YAML/JSON value into what the annotation ``hint`` asks for."""
    if hint is None or value is None:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _from_plain(non_none[0], value, where)
        return value
    if isinstance(hint, type) and issubclass(hint, StrictConfig):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        try:
            return hint.from_dict(value)
        except ConfigError as exc:
            raise ConfigError(f"{where} -> {exc}") from None
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        inner = args[0] if args else None
        items = [_from_plain(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    return value
