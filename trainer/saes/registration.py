"""``@register``: how an architecture file makes its SAE class known.

The table filled here is read only by the registry (trainer/registry.py), which imports every
architecture module through ``trainer/saes/__init__.py`` and answers every question about them
(build, load, options, fields). This module imports nothing of the trainer, so an architecture
file can register itself without importing the registry (which sits above the architectures).
"""

from __future__ import annotations

from typing import Any

REGISTERED: dict[str, Any] = {}
"""Registered SAE classes by ``architecture`` name (filled at import of their modules)."""


def register(cls: Any) -> Any:
    """Class decorator: make ``cls`` (an ``SAE`` subclass with ``architecture`` and ``Options``
    class attributes) available under ``cls.architecture``."""
    name = cls.architecture
    if name in REGISTERED and REGISTERED[name] is not cls:
        raise ValueError(f"architecture {name!r} is registered twice")
    REGISTERED[name] = cls
    return cls
