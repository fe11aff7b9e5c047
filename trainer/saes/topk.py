"""TopK (Gao et al. 2024): exactly ``top_k`` active latents per token, AuxK (``topk``).

* Encoding (training and inference alike): each token keeps its ``top_k`` largest
  pre-activations, ReLU'd (fewer when fewer are positive). No threshold, nothing to calibrate:
  a token's code never depends on its batch. The training step runs the same sparse kernels as
  BatchTopK (``trainer.sparse_ops.topk_per_token_forward``).
* Loss: ``mse + aux_penalty * AuxK`` (saes/auxk.py).
* SAELens export: ``topk`` with ``k = top_k`` (decoder rows are unit-norm, so SAELens's
  ``rescale_acts_by_decoder_norm`` is off and changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from .registration import register
from ..architecture_options import ArchitectureOptions
from ..sparse_ops import topk_per_token_forward
from .auxk import KSparseOptions, auxk_loss
from .base import SAE, SAELensFormat, TrainStepOutput


@dataclass
class TopKOptions(KSparseOptions):
    """Fields of ``topk``: ``top_k`` (active latents per token), ``top_k_aux`` and
    ``aux_penalty`` (see saes/auxk.py)."""


@register
class TopKSAE(SAE):
    """Per-token TopK with AuxK (module docstring)."""

    architecture: ClassVar[str] = "topk"
    Options: ClassVar[type[ArchitectureOptions]] = TopKOptions
    saelens_reads: ClassVar[Optional[str]] = "topk"
    saelens_read_fields: ClassVar[dict[str, str]] = {"top_k": "k"}
    inference_rule: ClassVar[str] = ("as in training: each token keeps its top_k largest "
                                     "pre-activations (ReLU'd)")

    @property
    def k(self) -> int:
        return int(self.cfg.top_k)

    def encode_scaled(self, x_scaled: Tensor) -> Tensor:
        pre = self.pre_activations(x_scaled)
        top = pre.topk(min(self.k, self.cfg.d_sae), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))

    def training_forward(self, x: Tensor, target: Optional[Tensor] = None) -> TrainStepOutput:
        xs, ys = self.scaled_pair(x, target)
        out = topk_per_token_forward(xs, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k,
                                     b_in=self.input_bias())
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
        fired[out.latent_idx] = True
        mse = (out.x_hat - ys).pow(2).mean()
        aux = auxk_loss(self, xs, ys, out.x_hat, out.pre_acts)
        return TrainStepOutput(
            target_scaled=ys, output=out.x_hat, reconstruction_loss=mse,
            sparsity_loss=self.cfg.aux_penalty * aux,
            terms={"mse": mse.detach(), "aux": aux.detach()}, fired=fired,
            l0=torch.tensor(out.values.numel() / max(xs.shape[0], 1)))

    def saelens_format(self, folded: SAE) -> SAELensFormat:
        return SAELensFormat("topk", cfg={"k": self.k, "rescale_acts_by_decoder_norm": False})

    def sparsity_coefficients(self) -> dict[str, float]:
        return {"aux_penalty": float(self.cfg.aux_penalty)}
