"""SAEConfig: the shape and the sparsity mechanism of one sparse autoencoder.

Field names follow the user's design notes (``sae_config.py``) so their code ports. Two derived
fields are filled in at construction and *follow* their sources: ``hook_spec`` (from
``hook_layer``/``hook_name``) and ``top_k_aux`` (from ``top_k``). ``to_dict`` leaves them out
while they still equal the derived value, so ``replace(hook_layer=3)`` re-derives them.

``use_error_term`` from the notes is not a field: it only matters for SAELens's hooked wrapper
(splicing ``x - x_hat`` back into the model so downstream activations stay exact), which this
project does not use. ``from_dict`` accepts ``use_error_term: false`` from ported configs and
rejects ``true`` with an explanation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from activation_cache import ConfigError, StrictConfig

ARCHITECTURES = ("batchtopk", "standard")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class SAEConfig(StrictConfig):
    """Configuration of one SAE (see the module docstring for the derived fields)."""

    d_in: int
    """Width of the activations the SAE reads (the model's d_model at ``hook_spec``)."""
    d_sae: int
    """Number of latents (dictionary size); usually 8-64 x d_in."""
    architecture: str = "batchtopk"
    """``"batchtopk"`` (BatchTopK with AuxK; needs ``top_k``) or ``"standard"`` (ReLU + L1)."""
    l1_coefficient: float = 0.01
    """L1 sparsity weight of the ``standard`` SAE (ignored by BatchTopK, whose sparsity is k).
    The penalty is sum_j |f_j| * ||W_dec[j]||, averaged over tokens, on inputs scaled so that
    E||x|| = sqrt(d_in). ``TrainingConfig.l1_coefficient`` overrides it for a run when set."""
    dtype: str = "float32"
    """Parameter dtype: float32 (default; on CPU bf16 matmuls are ~100x slower), float64,
    bfloat16 or float16. Running statistics (scale, threshold) are always float32."""
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
    top_k: Optional[int] = None
    """BatchTopK: mean number of active latents per token (the batch keeps k x n_tokens)."""
    top_k_aux: Optional[int] = None
    """AuxK: how many dead latents per token reconstruct the residual. Defaults to
    max(1, top_k // 2) as in the design notes; the reference implementations use far more
    (OpenAI and dictionary_learning d_in / 2, the BatchTopK reference 512), so raise it when
    many latents die."""
    n_batches_to_dead: int = 200
    """A latent that has not fired for this many consecutive training batches counts as dead
    (and feeds the AuxK loss)."""
    aux_penalty: float = 1.0 / 32.0
    """Weight of the AuxK loss. Our AuxK loss is normalised by the residual's variance
    (OpenAI / dictionary_learning convention), so 1/32 means the same at every scale; SAELens's
    unnormalised AuxK coefficient is not comparable."""

    # -- derived fields -------------------------------------------------------------------
    def derived_hook_spec(self) -> str:
        return f"blocks.{self.hook_layer}.{self.hook_name}"

    def derived_top_k_aux(self) -> Optional[int]:
        return None if self.top_k is None else max(1, self.top_k // 2)

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
        self._require(self.architecture in ARCHITECTURES, "architecture",
                      f"must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        self._require(self.dtype in DTYPES, "dtype",
                      f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self._require(isinstance(self.device, str) and bool(self.device), "device",
                      f"must be a device string such as 'cpu' or 'cuda', got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                self._fail("device", f"not a torch device: {self.device!r}")
        self._require(self.l1_coefficient >= 0, "l1_coefficient",
                      f"must be >= 0, got {self.l1_coefficient}")
        self._require(self.hook_layer >= 0, "hook_layer", f"must be >= 0, got {self.hook_layer}")
        self._require(self.n_batches_to_dead >= 1, "n_batches_to_dead",
                      f"must be >= 1, got {self.n_batches_to_dead}")
        self._require(self.aux_penalty >= 0, "aux_penalty",
                      f"must be >= 0, got {self.aux_penalty}")
        if self.top_k is not None:
            self._require(isinstance(self.top_k, int) and 1 <= self.top_k <= self.d_sae,
                          "top_k", f"must be in [1, d_sae={self.d_sae}], got {self.top_k!r}")
        if self.architecture == "batchtopk":
            self._require(self.top_k is not None, "top_k",
                          "is required for architecture 'batchtopk' (e.g. top_k: 32)")
        if self.top_k_aux is None:
            self.top_k_aux = self.derived_top_k_aux()
        else:
            self._require(isinstance(self.top_k_aux, int) and 1 <= self.top_k_aux <= self.d_sae,
                          "top_k_aux",
                          f"must be in [1, d_sae={self.d_sae}], got {self.top_k_aux!r}")
        if self.hook_spec is None:
            self.hook_spec = self.derived_hook_spec()
        self._require(isinstance(self.hook_spec, str) and bool(self.hook_spec), "hook_spec",
                      f"must be a non-empty hook name, got {self.hook_spec!r}")

    # -- helpers --------------------------------------------------------------------------
    def torch_dtype(self) -> torch.dtype:
        """The parameter dtype as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        """The parameter device (``"auto"`` resolved: cuda when available)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"SAEConfig.device: {self.device!r} but CUDA is not available on "
                              "this machine (use 'cpu' or 'auto')")
        return device

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out["hook_spec"] == self.derived_hook_spec():
            del out["hook_spec"]
        if out["top_k_aux"] == self.derived_top_k_aux():
            del out["top_k_aux"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "SAEConfig":
        if data is not None and isinstance(data, Mapping) and "use_error_term" in data:
            data = dict(data)
            if data.pop("use_error_term"):
                raise ConfigError(
                    "SAEConfig.use_error_term: not supported, remove it. It only matters for "
                    "SAELens's hooked SAE wrapper (adding x - x_hat back so the model's "
                    "downstream activations stay exact); sae-sweep's end-to-end losses splice "
                    "the reconstruction itself and never use an error term."
                )
        return super().from_dict(data)  # type: ignore[return-value]
