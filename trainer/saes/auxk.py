"""What the k-sparse architectures share: ``top_k`` and the AuxK dead-latent loss.

``KSparseOptions`` are the config fields of TopK, BatchTopK and Matryoshka BatchTopK.

**AuxK** (Gao et al. 2024): latents idle for ``n_batches_to_dead`` batches are dead. Per token,
the ``top_k_aux`` largest dead pre-activations (ReLU'd) reconstruct the **detached** residual
``e = target - output`` (an SAE: ``x - x_hat``) through the decoder (no bias):
``aux = mean_t ||e_t - e_hat_t||^2 / mean_t ||e_t - mean(e)||^2``. Normalising by the residual's
variance makes ``aux_penalty`` scale-free (OpenAI / dictionary_learning convention; SAELens's
unnormalised coefficient is not comparable); it is exactly 0 when nothing is dead. Because the
residual is detached, AuxK never pulls on the main reconstruction: only the dead latents'
encoder columns, biases and decoder rows get its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from ..architecture_options import ArchitectureOptions
from ..sparse_ops import auxk_reconstruct


@dataclass
class KSparseOptions(ArchitectureOptions):
    """Fields shared by the k-sparse architectures (TopK, BatchTopK, Matryoshka BatchTopK)."""

    top_k: Optional[int] = None
    """Active latents per token (TopK: exactly, per token; BatchTopK: on average, the batch
    keeps k x n_tokens). Required."""
    top_k_aux: Optional[int] = None
    """AuxK: how many dead latents per token reconstruct the residual. Defaults to
    max(1, top_k // 2) as in the design notes; the reference implementations use far more
    (OpenAI and dictionary_learning d_in / 2, the BatchTopK reference 512), so raise it when
    many latents die."""
    aux_penalty: float = 1.0 / 32.0
    """Weight of the AuxK loss (variance-normalised, so 1/32 means the same at every scale)."""

    width_capped: ClassVar[dict[str, int]] = {"top_k": 1, "top_k_aux": 0}

    def derived_values(self) -> dict[str, Any]:
        return {**super().derived_values(),
                "top_k_aux": None if self.top_k is None else max(1, self.top_k // 2)}

    def validate(self) -> None:
        super().validate()
        if self.top_k is None:
            self._fail("top_k", "is required for the k-sparse architectures (e.g. top_k: 32)")
        self._require(isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                      and self.top_k >= 1, "top_k", f"must be an integer >= 1, got {self.top_k!r}")
        if self.top_k_aux is None:
            self.top_k_aux = self.derived_values()["top_k_aux"]
        self._require(isinstance(self.top_k_aux, int) and not isinstance(self.top_k_aux, bool)
                      and self.top_k_aux >= 1, "top_k_aux",
                      f"must be an integer >= 1, got {self.top_k_aux!r}")
        self._require(isinstance(self.aux_penalty, (int, float))
                      and not isinstance(self.aux_penalty, bool) and self.aux_penalty >= 0,
                      "aux_penalty", f"must be >= 0, got {self.aux_penalty!r}")

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if self.top_k > cfg.d_sae:
            self._fail("top_k", f"must be in [1, d_sae={cfg.d_sae}], got {self.top_k}")
        if self.top_k_aux > cfg.d_sae:
            self._fail("top_k_aux", f"must be in [1, d_sae={cfg.d_sae}], got {self.top_k_aux}")


def auxk_loss(sae: Any, x_scaled: Tensor, target_scaled: Tensor, output: Tensor,
              pre_acts: Tensor, dead_mask: Optional[Tensor] = None) -> Tensor:
    """The AuxK loss (module docstring) of scaled inputs [N, d_in], their scaled targets and
    the reconstruction [N, d_out], and the detached encoder pre-activations [N, d_sae];
    ``dead_mask`` defaults to the SAE's."""
    if dead_mask is None:
        dead_mask = sae.dead_mask()
    if not bool(dead_mask.any()):
        return target_scaled.new_zeros(())
    residual = (target_scaled - output).detach()
    recon = auxk_reconstruct(x_scaled, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec,
                             pre_acts.reshape(-1, sae.cfg.d_sae), dead_mask,
                             int(sae.cfg.top_k_aux), b_in=sae.input_bias()).e_hat
    err = (residual - recon).pow(2).sum(-1).mean()
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return err / variance.clamp_min(torch.finfo(variance.dtype).tiny)
