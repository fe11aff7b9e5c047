"""``@register_evaluator``: how an evaluator file makes its class known.

The table filled here is read only by the evaluator registry (registry.py), which imports every
evaluator module through ``trainer/evaluators/__init__.py``. This module imports nothing of the
trainer, so an evaluator file registers itself without importing the registry.
"""

from __future__ import annotations

from typing import Any

REGISTERED: dict[str, Any] = {}
"""Registered Evaluator classes by ``name`` (filled at import of their modules)."""


def register_evaluator(cls: Any) -> Any:
    """Class decorator: make ``cls`` (an ``Evaluator`` subclass) available under ``cls.name``;
    its field names must be new."""
    name = cls.name
    if name in REGISTERED and REGISTERED[name] is not cls:
        raise ValueError(f"evaluator {name!r} is registered twice")
    taken = {f.name: other.name for other in REGISTERED.values() if other is not cls
             for f in other.fields}
    for f in cls.fields:
        if f.name in taken:
            raise ValueError(f"evaluator {name!r}: field {f.name!r} is already declared by "
                             f"evaluator {taken[f.name]!r}")
    REGISTERED[name] = cls
    return cls
