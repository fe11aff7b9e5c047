"""The architecture registry: name -> SAE class (and its options), and build/load.

An architecture registers itself with :func:`register` in its own file under
``trainer/saes/``; nothing else in the package lists architectures. The loop, evaluation, the
end-to-end objective, export and the sweep ask this registry (or the SAE object itself) and never
branch on the architecture. The architecture modules are imported on first use, so this module
imports nothing of theirs (no import loop: ``saes/*`` -> ``saes.base`` -> ``sae_config`` ->
``registry``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .sae_config import ArchitectureOptions, SAEConfig
    from .saes.base import SAE

_REGISTRY: dict[str, Any] = {}
_loaded = False


def register(cls: Any) -> Any:
    """Class decorator: make ``cls`` (an ``SAE`` subclass with ``architecture`` and ``Options``
    class attributes) available under ``cls.architecture``."""
    name = cls.architecture
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"architecture {name!r} is registered twice")
    _REGISTRY[name] = cls
    return cls


def _classes() -> dict[str, Any]:
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module(f"{__package__}.saes")  # each module registers itself
    return _REGISTRY


def architecture_names() -> list[str]:
    """Every registered architecture, sorted."""
    return sorted(_classes())


def sae_class(name: str) -> "type[SAE]":
    """The SAE class of architecture ``name``."""
    classes = _classes()
    if name not in classes:
        from activation_cache import ConfigError

        raise ConfigError(f"SAEConfig.architecture: must be one of "
                          f"{', '.join(sorted(classes))}, got {name!r}")
    return classes[name]


def options_class(name: str) -> "type[ArchitectureOptions]":
    """The options dataclass (the architecture's own config fields) of ``name``."""
    return sae_class(name).Options


def architectures_with_field(field: str) -> list[str]:
    """Architectures whose options declare ``field``."""
    return [n for n, c in sorted(_classes().items()) if field in c.Options.field_names()]


def all_option_fields() -> list[str]:
    """Every architecture-owned field name, over all architectures."""
    return sorted({f for c in _classes().values() for f in c.Options.field_names()})


def searchable_fields(name: str) -> tuple[str, ...]:
    """The fields a sweep may search on architecture ``name`` (its options' numeric fields)."""
    return options_class(name).searchable_fields()


def width_capped_fields(name: str) -> dict[str, int]:
    """Fields the define-by-run space caps at ``d_sae - offset`` (e.g. ``{"top_k": 1}``)."""
    return dict(options_class(name).width_capped)


def build_sae(cfg: "SAEConfig", *, seed: Optional[int] = None) -> "SAE":
    """A freshly initialised SAE of the class ``cfg.architecture`` names (seeded if ``seed``)."""
    return sae_class(cfg.architecture)(cfg, seed=seed)


def load_sae(path: str | Path, device: Optional[str] = None) -> "SAE":
    """Load an SAE saved with ``sae.save`` (or a training checkpoint folder) as the right class."""
    from .saes.base import SAE

    return SAE.load(path, device=device)


class _RegistryView(Mapping):
    """Read-only ``name -> SAE class`` view of the registry (filled on first use)."""

    def __getitem__(self, key: str) -> Any:
        if key not in _classes():
            raise KeyError(key)
        return _classes()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(architecture_names())

    def __len__(self) -> int:
        return len(_classes())


SAE_REGISTRY: Mapping[str, Any] = _RegistryView()
"""What trainer exports: every registered architecture's class by name."""
