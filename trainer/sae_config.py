"""SAEConfig: the shape of one sparse autoencoder (or transcoder), and the options its
architecture owns.

A config has two parts:

* the **common fields** every SAE has (``d_in``, ``d_sae``, ``architecture``, dtype, device,
  the input hook and the output hook, the dead-latent window), declared on :class:`SAEConfig`
  with their defaults (the one place they are written);
* ``options``: the **architecture's own fields** (its loss coefficients, ``top_k``, its
  threshold rule, group sizes...), an :class:`~trainer.architecture_options.ArchitectureOptions`
  dataclass declared by the architecture in its own file (``trainer/saes/<name>.py``).

In YAML (and through :func:`trainer.make_sae_config` in Python) both parts are written flat::

    sae: {d_in: 576, d_sae: 4608, architecture: batchtopk, top_k: 32, aux_penalty: 0.03}

The registry (trainer/registry.py) turns such a flat mapping into an ``SAEConfig`` with the
options of the architecture it names; this module does not know which architectures exist
(it imports neither the registry nor any architecture). ``SAEConfig(..., options=...)`` takes
the options object directly. ``cfg.top_k`` reads the architecture's field
(``cfg.options.top_k``). ``to_dict`` is flat and leaves derived values out while they still
equal their derivation (``hook_spec`` from ``hook_layer``/``hook_name``, ``hook_spec_out`` from
``hook_layer``/``hook_name_out``, ``d_out`` from ``d_in``; options may derive theirs, e.g.
``top_k_aux`` from ``top_k``), so ``replace(hook_layer=3)`` re-derives them.

**Input and output.** An SAE reads one hook and reconstructs it: leave ``hook_name_out``,
``hook_spec_out`` and ``d_out`` unset (they then equal the input's). A transcoder reads one
hook (e.g. the MLP input ``blocks.6.ln2.hook_normalized``) and reconstructs another
(``hook_name_out: hook_mlp_out``, width ``d_out``); only architectures whose options say
``transcodes`` accept an output side different from the input.

``use_error_term`` (SAELens) is not a field: it only matters for SAELens's hooked wrapper
(splicing ``x - x_hat`` back into the model), which this project does not use; the registry
accepts ``use_error_term: false`` from ported configs and rejects ``true``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from activation_cache import ConfigError, StrictConfig

from .architecture_options import ArchitectureOptions
from .device import is_device_spec

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class SAEConfig(StrictConfig):
    """Configuration of one SAE: the common fields below plus ``options``, the architecture's
    own fields (see the module docstring and ``trainer/saes/<architecture>.py``)."""

    d_in: int
    """Width of the activations the SAE reads (the model's width at ``hook_spec``)."""
    d_sae: int
    """Number of latents (dictionary size); usually 8-64 x d_in."""
    architecture: str
    """Registered architecture name (``trainer.field_catalog().architectures``); the flat form
    defaults to the registry's default architecture (``trainer/saes/__init__.py``)."""
    dtype: str = "float32"
    """Parameter dtype: float32 (default; on CPU bf16 matmuls are ~100x slower), float64,
    bfloat16 or float16. Running statistics and thresholds are always float32."""
    device: str = "cpu"
    """Torch device of the parameters, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``"auto"`` picks
    cuda when available."""
    hook_layer: int = 9
    """Block index of the hooked activation (used to derive ``hook_spec`` and
    ``hook_spec_out``)."""
    hook_name: str = "hook_resid_post"
    """transformer_lens hook name within the block (used to derive ``hook_spec``)."""
    hook_spec: Optional[str] = None
    """Full transformer_lens hook point of the input; derived as
    ``blocks.{hook_layer}.{hook_name}`` unless given (give it for hooks outside the blocks,
    e.g. ``hook_embed``)."""
    hook_name_out: Optional[str] = None
    """Transcoders: the hook name within block ``hook_layer`` the SAE reconstructs (e.g.
    ``hook_mlp_out``); None: the input hook (an SAE)."""
    hook_spec_out: Optional[str] = None
    """Full hook point of the output (what the SAE reconstructs and what the end-to-end
    splice replaces); derived as ``blocks.{hook_layer}.{hook_name_out}`` when
    ``hook_name_out`` is given, else ``hook_spec``."""
    d_out: Optional[int] = None
    """Width of the output hook's activations; None: ``d_in`` (an SAE)."""
    n_batches_to_dead: int = 200
    """A latent that has not fired for this many consecutive training batches counts as dead
    (``dead_fraction_train``; the k-sparse architectures' AuxK loss revives them)."""
    options: Optional[ArchitectureOptions] = None
    """The architecture's own fields (the registry builds them from the flat keys)."""

    DATA_FIELDS: ClassVar[tuple[str, ...]] = (
        "d_in", "d_out", "hook_spec", "hook_layer", "hook_name", "hook_spec_out",
        "hook_name_out")
    """Fields that say which activations the SAE reads and writes: set from the cache and the
    hooks (a sweep sets them itself), never searched."""

    # -- architecture fields read through the config ---------------------------------------
    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: the architecture's own fields
        if name.startswith("_") or name == "options":
            raise AttributeError(name)
        options = self.__dict__.get("options")
        if options is not None and name in options.field_names():
            return getattr(options, name)
        raise AttributeError(f"SAEConfig has no field {name!r} (architecture "
                             f"{self.__dict__.get('architecture')!r})")

    # -- derived fields -------------------------------------------------------------------
    def derived_hook_spec(self) -> str:
        return f"blocks.{self.hook_layer}.{self.hook_name}"

    def derived_hook_spec_out(self) -> str:
        if self.hook_name_out is None:
            return self.hook_spec  # type: ignore[return-value]
        return f"blocks.{self.hook_layer}.{self.hook_name_out}"

    @property
    def autoencodes(self) -> bool:
        """True when the output side is the input (an SAE), False for a transcoder."""
        return self.hook_spec_out == self.hook_spec and self.d_out == self.d_in

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        if isinstance(self.hook_layer, str) and self.hook_layer.strip().isdigit():
            self.hook_layer = int(self.hook_layer)  # the design notes stored it as a string
        for name in ("d_in", "d_sae", "hook_layer", "n_batches_to_dead"):
            value = getattr(self, name)
            self._require(isinstance(value, int) and not isinstance(value, bool), name,
                          f"must be an integer, got {value!r}")
        self._require(self.d_in >= 1, "d_in", f"must be >= 1, got {self.d_in}")
        self._require(self.d_sae >= 1, "d_sae", f"must be >= 1, got {self.d_sae}")
        self._require(isinstance(self.architecture, str) and bool(self.architecture),
                      "architecture", f"must be an architecture name, got {self.architecture!r}")
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
        if self.hook_name_out is not None:
            self._require(isinstance(self.hook_name_out, str) and bool(self.hook_name_out),
                          "hook_name_out", f"must be a hook name, got {self.hook_name_out!r}")
        if self.hook_spec_out is None:
            self.hook_spec_out = self.derived_hook_spec_out()
        self._require(isinstance(self.hook_spec_out, str) and bool(self.hook_spec_out),
                      "hook_spec_out", f"must be a non-empty hook name, got {self.hook_spec_out!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        self._require(isinstance(self.d_out, int) and not isinstance(self.d_out, bool)
                      and self.d_out >= 1, "d_out", f"must be an integer >= 1, got {self.d_out!r}")
        if self.options is None:
            self._fail("options", f"the fields of architecture {self.architecture!r} are missing "
                                  "(build a flat config with trainer.make_sae_config or "
                                  "trainer.sae_config_from_dict)")
        self._require(isinstance(self.options, ArchitectureOptions), "options",
                      f"must be an ArchitectureOptions, got {type(self.options).__name__}")
        if not self.autoencodes and not self.options.transcodes:
            which = ("hook_name_out" if self.hook_name_out is not None else
                     "hook_spec_out" if self.hook_spec_out != self.hook_spec else "d_out")
            self._fail(which, f"architecture {self.architecture!r} reconstructs its own input "
                              f"(output {self.hook_spec_out} d_out={self.d_out} differs from "
                              f"input {self.hook_spec} d_in={self.d_in}); use a transcoder "
                              "architecture, or leave the output side unset")
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

    def common_dict(self) -> dict[str, Any]:
        """The common fields, leaving derived values out while they equal their derivation."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name != "options":
                out[f.name] = getattr(self, f.name)
        if out["hook_spec"] == self.derived_hook_spec():
            del out["hook_spec"]
        if out["hook_spec_out"] == self.derived_hook_spec_out():
            del out["hook_spec_out"]
        if out["hook_name_out"] is None:
            del out["hook_name_out"]
        if out["d_out"] == self.d_in:
            del out["d_out"]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Flat: the common fields and the architecture's own (what YAML and config.json hold)."""
        out = self.common_dict()
        if self.options is not None:
            out.update(self.options.to_dict())
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "SAEConfig":
        raise ConfigError("SAEConfig: a flat mapping of SAE fields is read by the registry "
                          "(trainer.sae_config_from_dict), which knows the architectures")

    def replace(self, **changes: Any) -> "SAEConfig":
        """A validated copy with some common fields or own (option) fields changed. Another
        architecture needs its own options: build it with ``trainer.make_sae_config``."""
        if "architecture" in changes and changes["architecture"] != self.architecture:
            raise ConfigError(f"SAEConfig.architecture: replace() keeps the architecture "
                              f"({self.architecture!r}); build a {changes['architecture']!r} "
                              "config with trainer.make_sae_config")
        own = set(self.options.field_names()) if self.options is not None else set()
        option_changes = {k: v for k, v in changes.items() if k in own}
        common = self.common_dict()
        common.update({k: v for k, v in changes.items() if k not in own})
        unknown = sorted(set(common) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"SAEConfig: unknown field(s) {', '.join(unknown)} for "
                              f"architecture {self.architecture!r}")
        options = self.options
        if options is not None:
            data = options.to_dict()
            data.update(option_changes)
            options = type(options).from_dict(data)
        common.pop("options", None)
        return type(self)(**common, options=options)


def common_field_names() -> tuple[str, ...]:
    """The fields every SAEConfig has, whatever its architecture."""
    return tuple(f.name for f in dataclasses.fields(SAEConfig) if f.name != "options")
