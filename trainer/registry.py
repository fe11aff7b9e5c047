"""The architecture registry: name -> SAE class and its options; flat configs; build and load.

An architecture registers itself with ``@register`` (trainer/saes/registration.py) in its own
file under ``trainer/saes/``, imported by ``trainer/saes/__init__.py``; nothing else in the
package lists architectures. This module sits **above** the configs and the architectures: it
imports them, and neither imports it, so there is no import loop (``sae_config`` ->
``architecture_options``; ``saes/*`` -> ``saes/base`` -> ``architecture_options``; this module
-> both). It is where

* a flat ``sae:`` mapping (YAML, ``config.json``, :func:`make_sae_config`) becomes an
  ``SAEConfig`` with the options of the architecture it names (:func:`sae_config_from_dict`):
  a field of another architecture is refused with the architectures that have it, an unknown
  key gets the closest known name;
* ``build_sae`` and ``load_sae`` pick the class;
* the questions about architectures and their fields are answered (the sweep asks them all at
  once through ``trainer.field_catalog()``, trainer/fields.py).

The loop, evaluation, the end-to-end objective, export and the sweep ask this registry (or the
SAE object itself) and never branch on the architecture.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

from activation_cache import ConfigError

from . import saes  # noqa: F401  (imports every architecture module: they register)
from .architecture_options import ArchitectureOptions
from .errors import CheckpointMismatchError
from .sae_config import SAEConfig, common_field_names
from .saes.base import CONFIG_FILE, HISTORY_FILE, SAE, SAEDescription, WEIGHTS_FILE
from .saes.registration import REGISTERED, register

__all__ = ["register", "architecture_names", "sae_class", "options_class",
           "architectures_with_field", "all_option_fields", "searchable_fields",
           "width_capped_fields", "architecture_fields", "sae_config_from_dict",
           "make_sae_config", "build_sae", "load_sae", "read_sae_config", "describe_sae",
           "saelens_readers",
           "SAE_REGISTRY"]


def architecture_names() -> list[str]:
    """Every registered architecture, sorted."""
    return sorted(REGISTERED)


def sae_class(name: str) -> "type[SAE]":
    """The SAE class of architecture ``name`` (a one-line ConfigError for an unknown name)."""
    if name not in REGISTERED:
        names = architecture_names()
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"SAEConfig.architecture: must be one of {', '.join(names)}, got "
                          f"{name!r}{hint}")
    return REGISTERED[name]


def options_class(name: str) -> "type[ArchitectureOptions]":
    """The options dataclass (the architecture's own config fields) of ``name``."""
    return sae_class(name).Options


def architecture_fields(name: str) -> tuple[str, ...]:
    """The config fields architecture ``name`` owns (its options)."""
    return options_class(name).field_names()


def architectures_with_field(field: str) -> list[str]:
    """Architectures whose options declare ``field``."""
    return [n for n, c in sorted(REGISTERED.items()) if field in c.Options.field_names()]


def all_option_fields() -> list[str]:
    """Every architecture-owned field name, over all architectures."""
    return sorted({f for c in REGISTERED.values() for f in c.Options.field_names()})


def searchable_fields(name: str) -> tuple[str, ...]:
    """The fields a sweep may search on architecture ``name`` (its options' numeric fields)."""
    return options_class(name).searchable_fields()


def width_capped_fields(name: str) -> dict[str, int]:
    """Fields the define-by-run space caps at ``d_sae - offset`` (e.g. ``{"top_k": 1}``)."""
    return dict(options_class(name).width_capped)


def saelens_readers() -> dict[str, "type[SAE]"]:
    """SAELens architecture -> the class whose inference encoding is the same (the classes'
    ``saelens_reads``): what ``trainer.load_saelens`` can read."""
    return {c.saelens_reads: c for _, c in sorted(REGISTERED.items())
            if c.saelens_reads is not None}


# -- flat configs ---------------------------------------------------------------------------


def default_architecture() -> str:
    """The architecture of a flat config that names none (``trainer/saes/__init__.py``)."""
    return saes.DEFAULT_ARCHITECTURE


def sae_config_from_dict(data: Mapping[str, Any] | None) -> SAEConfig:
    """An ``SAEConfig`` from a flat mapping (the ``sae:`` block of a YAML, a ``config.json``):
    the common fields go to ``SAEConfig``, the rest to the options of the architecture named
    by ``architecture`` (default: :func:`default_architecture`). One-line ConfigErrors name
    the key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"SAEConfig: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    if "use_error_term" in data and data.pop("use_error_term"):
        raise ConfigError(
            "SAEConfig.use_error_term: not supported, remove it. It only matters for "
            "SAELens's hooked SAE wrapper (adding x - x_hat back so the model's "
            "downstream activations stay exact); sae-sweep's end-to-end losses splice "
            "the reconstruction itself and never use an error term."
        )
    if "options" in data:
        raise ConfigError("SAEConfig: write the architecture's fields flat (e.g. top_k: 32), "
                          "not under `options`")
    for key in ("d_in", "d_sae"):
        if key not in data:
            raise ConfigError(f"SAEConfig.{key}: required (missing)")
    architecture = data.setdefault("architecture", default_architecture())
    klass = options_class(architecture)
    own = set(klass.field_names())
    common = set(common_field_names())
    for key in data:
        if key in own or key in common:
            continue
        owners = architectures_with_field(key)
        if owners:
            raise ConfigError(f"SAEConfig.{key}: does not apply to architecture "
                              f"{architecture!r} (it is a field of {', '.join(owners)}); "
                              "remove it")
        known = sorted(own | common)
        close = difflib.get_close_matches(str(key), known + all_option_fields(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"SAEConfig: unknown key {key!r}{hint}; known keys for "
                          f"architecture {architecture!r}: {', '.join(known)}")
    options = klass.from_dict({k: v for k, v in data.items() if k in own})
    try:
        return SAEConfig(**{k: v for k, v in data.items() if k in common}, options=options)
    except TypeError as exc:
        raise ConfigError(f"SAEConfig: {exc}") from None


def make_sae_config(**fields: Any) -> SAEConfig:
    """``SAEConfig`` from flat keyword fields, as in YAML:
    ``make_sae_config(d_in=576, d_sae=4608, architecture="topk", top_k=32)``."""
    return sae_config_from_dict(fields)


def describe_sae(cfg: SAEConfig) -> SAEDescription:
    """What a model card says about the architecture of ``cfg`` (the architecture's own
    ``describe``: its fields and its inference rule)."""
    return sae_class(cfg.architecture).describe(cfg)


# -- build and load -------------------------------------------------------------------------


def build_sae(cfg: SAEConfig, *, seed: Optional[int] = None) -> SAE:
    """A freshly initialised SAE of the class ``cfg.architecture`` names (seeded if ``seed``)."""
    return sae_class(cfg.architecture)(cfg, seed=seed)


def read_sae_config(path: str | Path) -> SAEConfig:
    """The SAEConfig in ``path/config.json`` (a saved SAE or a checkpoint)."""
    file = Path(path) / CONFIG_FILE
    if not file.exists():
        raise CheckpointMismatchError(f"{file} does not exist (not a saved SAE folder)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointMismatchError(f"{file}: not valid JSON: {exc}") from None
    try:
        return sae_config_from_dict(data)
    except ConfigError as exc:  # names the field
        raise CheckpointMismatchError(f"{file}: {exc}") from None


def load_sae(path: str | Path, device: Optional[str] = None, *, load_history: bool = False,
             config: Optional[SAEConfig] = None) -> Any:
    """Rebuild the SAE saved in ``path`` (``sae.save``, a training checkpoint folder, a native
    export) as the class its config names.

    ``device`` overrides the saved device (a saved cuda device falls back to cpu when CUDA is
    unavailable). ``config``: build with this config instead of the saved one (its
    architecture and shapes must match: fine-tuning a saved SAE under a job's own options).
    Returns the SAE, or ``(sae, history)`` when ``load_history`` is true.
    """
    path = Path(path)
    saved = read_sae_config(path)
    cfg = saved if config is None else config
    if config is not None:
        for name in ("architecture", "d_in", "d_sae", "d_out"):
            if getattr(config, name) != getattr(saved, name):
                raise CheckpointMismatchError(
                    f"{path / CONFIG_FILE}: the saved SAE has {name}={getattr(saved, name)!r}, "
                    f"but {getattr(config, name)!r} was asked for")
    if device is None and cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            device = "cpu"  # saved on a GPU machine, loaded on a CPU one
    if device is not None:
        cfg = cfg.replace(device=device)
    sae = build_sae(cfg)
    sae.load_weights(path / WEIGHTS_FILE)
    if not load_history:
        return sae
    hist_path = path / HISTORY_FILE
    history = json.loads(hist_path.read_text()) if hist_path.exists() else []
    return sae, history


class _RegistryView(Mapping):
    """Read-only ``name -> SAE class`` view of the registry."""

    def __getitem__(self, key: str) -> Any:
        return REGISTERED[key]

    def __iter__(self) -> Iterator[str]:
        return iter(architecture_names())

    def __len__(self) -> int:
        return len(REGISTERED)


SAE_REGISTRY: Mapping[str, Any] = _RegistryView()
"""What trainer exports: every registered architecture's class by name."""
