"""SAEConfig: the shape of one sparse autoencoder, and the options its architecture owns.

A config has two parts:

* the **common fields** every SAE has (``d_in``, ``d_sae``, ``architecture``, dtype, device,
  the hook, the dead-latent window), declared on :class:`SAEConfig`;
* the **architecture's own fields** (its loss coefficients, ``top_k``, thresholds, group
  sizes...), declared by the architecture in its own file as an :class:`ArchitectureOptions`
  dataclass (``trainer/saes/<name>.py``) and validated there.

Both are written flat, in YAML and in Python, exactly as before::

    sae: {d_in: 576, d_sae: 4608, architecture: batchtopk, top_k: 32, aux_penalty: 0.03}
    SAEConfig(d_in=576, d_sae=4608, architecture="standard", l1_coefficient=0.01)

``cfg.top_k`` reads the architecture's field (``cfg.options.top_k``). A field of another
architecture is refused with the architectures that do have it; an unknown key gets the
closest known name. ``to_dict`` is flat and leaves derived values out while they still equal
their derivation (``hook_spec`` from ``hook_layer``/``hook_name``; options may derive theirs, e.g.
``top_k_aux`` from ``top_k``), so ``replace(hook_layer=3)`` re-derives them.

``use_error_term`` from the design notes is not a field: it only matters for SAELens's hooked
wrapper (splicing ``x - x_hat`` back into the model), which this project does not use.
``from_dict`` accepts ``use_error_term: false`` from ported configs and rejects ``true``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

import torch

from activation_cache import ConfigError, StrictConfig

from . import registry
from .device import is_device_spec

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class ArchitectureOptions(StrictConfig):
    """Base of an architecture's own config fields (one dataclass per architecture).

    Subclasses declare their fields with docstrings, validate them in ``validate`` (alone) and
    in :meth:`check` (against the common fields, e.g. ``top_k <= d_sae``), and say how the
    sweep may search them: every int/float field is searchable; ``width_capped`` maps a field
    to the offset below ``d_sae`` the define-by-run space caps it at (``top_k`` < d_sae).
    """

    width_capped: ClassVar[dict[str, int]] = {}

    def check(self, cfg: "SAEConfig") -> None:
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


@dataclass(init=False)
class SAEConfig(StrictConfig):
    """Configuration of one SAE: the common fields below plus ``options``, the architecture's
    own fields (see the module docstring and ``trainer/saes/<architecture>.py``)."""

    d_in: int
    """Width of the activations the SAE reads (the model's d_model at ``hook_spec``)."""
    d_sae: int
    """Number of latents (dictionary size); usually 8-64 x d_in."""
    architecture: str = "batchtopk"
    """Registered architecture name (``trainer.architecture_names()``): ``standard`` (ReLU +
    L1), ``topk``, ``batchtopk``, ``jumprelu``, ``matryoshka_batchtopk``."""
    dtype: str = "float32"
    """Parameter dtype: float32 (default; on CPU bf16 matmuls are ~100x slower), float64,
    bfloat16 or float16. Running statistics and thresholds are always float32."""
    device: str = "cpu"
    """Torch device of the parameters, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``"auto"`` picks
    cuda when available."""
    hook_layer: int = 9
    """Block index of the hooked activation (used to derive ``hook_spec``)."""
    hook_name: str = "hook_resid_post"
    """transformer_lens hook name within the block (used to derive ``hook_spec``)."""
    hook_spec: Optional[str] = None
    """Full transformer_lens hook point; derived as ``blocks.{hook_layer}.{hook_name}`` unless
    given (give it for hooks outside the blocks, e.g. ``hook_embed``)."""
    n_batches_to_dead: int = 200
    """A latent that has not fired for this many consecutive training batches counts as dead
    (``dead_fraction_train``; the k-sparse architectures' AuxK loss revives them)."""
    options: Optional[ArchitectureOptions] = None
    """The architecture's own fields (built from the flat keys; see the module docstring)."""

    def __init__(self, d_in: int, d_sae: int, architecture: str = "batchtopk",
                 dtype: str = "float32", device: str = "cpu", hook_layer: int = 9,
                 hook_name: str = "hook_resid_post", hook_spec: Optional[str] = None,
                 n_batches_to_dead: int = 200, options: Optional[ArchitectureOptions] = None,
                 **architecture_fields: Any):
        self.d_in, self.d_sae, self.architecture = d_in, d_sae, architecture
        self.dtype, self.device = dtype, device
        self.hook_layer, self.hook_name, self.hook_spec = hook_layer, hook_name, hook_spec
        self.n_batches_to_dead = n_batches_to_dead
        self._check_architecture()
        klass = registry.options_class(self.architecture)
        if options is not None and architecture_fields:
            raise ConfigError("SAEConfig: give the architecture's fields flat or as `options`, "
                              "not both")
        if options is None:
            self._check_keys(architecture_fields, klass)
            options = klass.from_dict(architecture_fields)
        elif not isinstance(options, klass):
            raise ConfigError(f"SAEConfig.options: architecture {self.architecture!r} takes "
                              f"{klass.__name__}, got {type(options).__name__}")
        self.options = options
        self.validate()

    # -- architecture fields read through the config ---------------------------------------
    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: the architecture's own fields
        if name.startswith("_") or name == "options":
            raise AttributeError(name)
        options = self.__dict__.get("options")
        if options is not None and name in options.field_names():
            return getattr(options, name)
        owners = registry.architectures_with_field(name)
        if owners:
            raise AttributeError(
                f"SAEConfig.{name} belongs to architecture(s) {', '.join(owners)}, not "
                f"{self.__dict__.get('architecture')!r}")
        raise AttributeError(f"SAEConfig has no field {name!r}")

    # -- derived fields -------------------------------------------------------------------
    def derived_hook_spec(self) -> str:
        return f"blocks.{self.hook_layer}.{self.hook_name}"

    # -- validation -----------------------------------------------------------------------
    def _check_architecture(self) -> None:
        names = registry.architecture_names()
        if self.architecture not in names:
            close = difflib.get_close_matches(str(self.architecture), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self._fail("architecture", f"must be one of {', '.join(names)}, got "
                                       f"{self.architecture!r}{hint}")

    def _check_keys(self, data: Mapping[str, Any], klass: type[ArchitectureOptions]) -> None:
        own = set(klass.field_names())
        common = {f.name for f in dataclasses.fields(self)} - {"options"}
        for key in data:
            if key in own:
                continue
            owners = registry.architectures_with_field(key)
            if owners:
                self._fail(key, f"does not apply to architecture {self.architecture!r} (it is "
                                f"a field of {', '.join(owners)}); remove it")
            known = sorted(own | common)
            close = difflib.get_close_matches(str(key), known + registry.all_option_fields(),
                                              n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"SAEConfig: unknown key {key!r}{hint}; known keys for "
                              f"architecture {self.architecture!r}: {', '.join(known)}")

    def validate(self) -> None:
        if isinstance(self.hook_layer, str) and self.hook_layer.strip().isdigit():
            self.hook_layer = int(self.hook_layer)  # the design notes stored it as a string
        for name in ("d_in", "d_sae", "hook_layer", "n_batches_to_dead"):
            value = getattr(self, name)
            self._require(isinstance(value, int) and not isinstance(value, bool), name,
                          f"must be an integer, got {value!r}")
        self._require(self.d_in >= 1, "d_in", f"must be >= 1, got {self.d_in}")
        self._require(self.d_sae >= 1, "d_sae", f"must be >= 1, got {self.d_sae}")
        self._check_architecture()
        self._require(self.dtype in DTYPES, "dtype",
                      f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self._require(isinstance(self.device, str) and bool(self.device), "device",
                      f"must be a device string such as 'cpu' or 'cuda', got {self.device!r}")
        self._require(is_device_spec(self.device), "device",
                      f"{self.device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        self._require(self.hook_layer >= 0, "hook_layer", f"must be >= 0, got {self.hook_layer}")
        self._require(self.n_batches_to_dead >= 1, "n_batches_to_dead",
                      f"must be >= 1, got {self.n_batches_to_dead}")
        if self.hook_spec is None:
            self.hook_spec = self.derived_hook_spec()
        self._require(isinstance(self.hook_spec, str) and bool(self.hook_spec), "hook_spec",
                      f"must be a non-empty hook name, got {self.hook_spec!r}")
        if self.options is not None:
            self.options.check(self)

    # -- helpers --------------------------------------------------------------------------
    def torch_dtype(self) -> torch.dtype:
        """The parameter dtype as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        """The parameter device (``auto``: the GPU this process sees -- in a Ray trial the one
        Ray assigned -- else the CPU); a one-line ConfigError when CUDA is asked for and absent."""
        from .device import resolve_device

        return resolve_device(self.device, field="SAEConfig.device")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name != "options":
                out[f.name] = getattr(self, f.name)
        if out["hook_spec"] == self.derived_hook_spec():
            del out["hook_spec"]
        if self.options is not None:
            out.update(self.options.to_dict())
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "SAEConfig":
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
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"SAEConfig: {exc}") from None

    def replace(self, **changes: Any) -> "SAEConfig":
        """A validated copy with some fields changed. Changing ``architecture`` drops the old
        architecture's fields that the new one does not have."""
        data = self.to_dict()
        data.update(changes)
        if "architecture" in changes and changes["architecture"] != self.architecture:
            keep = set(registry.options_class(data["architecture"]).field_names())
            for name in self.options.field_names() if self.options else ():
                if name not in keep and name not in changes:
                    data.pop(name, None)
        return type(self).from_dict(data)


def common_field_names() -> tuple[str, ...]:
    """The fields every SAEConfig has, whatever its architecture."""
    return tuple(f.name for f in dataclasses.fields(SAEConfig) if f.name != "options")
