"""BatchTopK (Bussmann et al. 2024): the batch keeps k x n_tokens activations; AuxK; a
calibrated fp32 inference threshold (``batchtopk``).

* **Training encoding**: over the whole flattened batch keep the ``top_k x n_tokens`` largest
  ReLU'd pre-activations (encoder bias included); the hot path is
  ``trainer.sparse_ops.topk_sae_forward``. Loss: ``mse + aux_penalty * AuxK`` (saes/auxk.py).
* **Inference encoding** (what export ships): a JumpReLU with one global threshold theta,
  ``f = relu(pre) * (pre > theta)``, so a token's code does not depend on its batch. theta is
  an fp32 buffer: an EMA of each step's smallest selected activation (``running["min_selected"]``
  of the training forward, the minimum over a step's chunks) once the threshold warm-up is over,
  and :meth:`calibrate` sets it from tokens so that the inference L0 there is ``top_k``.
  Before theta exists (buffer ``threshold`` < 0) inference is a plain ReLU: such an SAE is not
  ready to ship (``needs_calibration``; the trainer calibrates before it evaluates or saves).
* SAELens export: ``jumprelu`` with theta as every latent's threshold (as SAELens saves its own
  BatchTopK SAEs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Optional

import torch
from torch import Tensor

from ..registry import register
from ..sae_config import ArchitectureOptions
from ..sparse_ops import topk_sae_forward
from .auxk import KSparseOptions, auxk_loss
from .base import SAE, SAELensFormat, TrainStepOutput


@dataclass
class BatchTopKOptions(KSparseOptions):
    """Fields of ``batchtopk``: ``top_k`` (mean active latents per token), ``top_k_aux`` and
    ``aux_penalty`` (see saes/auxk.py)."""


@register
class BatchTopKSAE(SAE):
    """BatchTopK SAE with AuxK and a calibrated fp32 inference threshold (module docstring)."""

    architecture: ClassVar[str] = "batchtopk"
    Options: ClassVar[type[ArchitectureOptions]] = BatchTopKOptions
    training_encoding_differs: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True

    def init_architecture(self) -> None:
        self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float32,
                                                     device=self.device))

    @property
    def k(self) -> int:
        return int(self.cfg.top_k)

    # -- inference ---------------------------------------------------------------------------
    def encode_scaled(self, x_scaled: Tensor) -> Tensor:
        pre = self.pre_activations(x_scaled)
        theta = self.threshold.clamp_min(0).to(pre.dtype)
        return torch.relu(pre) * (pre > theta)

    def inference_threshold(self) -> Optional[float]:
        theta = float(self.threshold)
        return theta if theta >= 0 else None

    # -- training ------------------------------------------------------------------------------
    def selection(self, xs: Tensor):
        """The training encoding of scaled tokens [N, d_in] (a ``TopKForward``)."""
        return topk_sae_forward(xs, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k)

    def training_forward(self, x: Tensor) -> TrainStepOutput:
        xs = self.scale_input(x).reshape(-1, self.cfg.d_in)
        out = self.selection(xs)
        return self._output(xs, out, (out.x_hat - xs).pow(2).mean(), {})

    def _output(self, xs: Tensor, out, reconstruction: Tensor,
                extra_terms: dict[str, Tensor]) -> TrainStepOutput:
        n = xs.shape[0]
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
        fired[out.latent_idx] = True
        values = out.values.detach()
        aux = auxk_loss(self, xs, out.x_hat, out.pre_acts)
        mse = (out.x_hat - xs).pow(2).mean().detach()
        running = {"min_selected": values.min().float()} if values.numel() else {}
        return TrainStepOutput(
            x_scaled=xs, x_hat=out.x_hat, reconstruction_loss=reconstruction,
            sparsity_loss=self.cfg.aux_penalty * aux,
            terms={"mse": mse, "aux": aux.detach(), **extra_terms},
            fired=fired, l0=torch.tensor(values.numel() / max(n, 1)), running=running)

    @torch.no_grad()
    def update_running_statistics(self, running: dict[str, Tensor], *, update_threshold: bool,
                                  threshold_beta: float) -> None:
        """The fp32 EMA of the smallest selected activation (after the threshold warm-up)."""
        if not update_threshold or "min_selected" not in running:
            return
        m = running["min_selected"].float().to(self.threshold.device)
        ema = threshold_beta * self.threshold + (1.0 - threshold_beta) * m
        self.threshold.copy_(torch.where(self.threshold < 0, m, ema))

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor], max_tokens: int,
                  chunk_candidates: int = 2) -> Optional[str]:
        """Set theta so that ``top_k`` x n_tokens activations of ``batches`` exceed it (exactly,
        ties aside), i.e. the inference L0 on these tokens is ``top_k``.

        ``batches``: iterable of raw [n, d_in] tensors, consumed up to ``max_tokens`` tokens.
        Each batch contributes its ``chunk_candidates x top_k x n`` largest activations as
        candidates; if a batch might hold more of the global top than that, the pass is
        repeated with 4x more candidates. Returns a description, or None without data.
        """
        kept: list[Tensor] = []
        total = 0
        for batch in batches:
            batch = batch[: max_tokens - total]
            if batch.shape[0] == 0:
                break
            kept.append(batch)
            total += batch.shape[0]
            if total >= max_tokens:
                break
        if total == 0:
            return None
        before = float(self.threshold)
        target = self.k * total
        factor = chunk_candidates
        while True:
            pools, floors = [], []  # per batch: candidates, and the smallest one if truncated
            for batch in kept:
                acts = torch.relu(self.pre_activations(self.scale_input(batch))).reshape(-1)
                m = min(factor * self.k * batch.shape[0], acts.numel())
                top = acts.topk(m, sorted=False).values.float()
                pools.append(top)
                if m < acts.numel():
                    floors.append(top.min())
            pool = torch.cat(pools)
            kth = pool.topk(min(target, pool.numel()), sorted=False).values.min()
            # exact unless a truncated batch kept only values >= kth (it may hold more of them)
            if all(bool(f < kth) for f in floors) or factor * self.k >= self.cfg.d_sae:
                break
            factor *= 4
        # `target` activations are >= kth; the JumpReLU keeps pre > theta: step just below it
        theta = torch.nextafter(kth, kth.new_zeros(()))
        self.threshold.copy_(theta.clamp_min(0))
        return (f"threshold {before:.5g} -> {float(self.threshold):.5g} "
                f"(inference L0 = top_k = {self.k} on {total} calibration tokens)")

    # -- export --------------------------------------------------------------------------------
    def saelens_format(self, folded: SAE) -> SAELensFormat:
        theta = folded.threshold.clamp_min(0).to(folded.dtype)
        return SAELensFormat("jumprelu", tensors={"threshold": theta.expand(self.cfg.d_sae).clone()},
                             metadata={"top_k": self.k})

    def sparsity_coefficients(self) -> dict[str, float]:
        return {"aux_penalty": float(self.cfg.aux_penalty)}
