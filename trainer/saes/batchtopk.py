"""BatchTopK (Bussmann et al. 2024): the batch keeps k x n_tokens activations; AuxK; a
calibrated fp32 inference threshold (``batchtopk``).

* **Training encoding**: over the whole flattened batch keep the ``top_k x n_tokens`` largest
  ReLU'd pre-activations (encoder bias included); the hot path is
  ``trainer.sparse_ops.topk_sae_forward``. Loss: ``mse + aux_penalty * AuxK`` (saes/auxk.py).
* **Inference encoding** (what export ships): a JumpReLU with one global threshold theta,
  ``f = relu(pre) * (pre > theta)``, so a token's code does not depend on its batch. theta is
  an fp32 buffer: an EMA (decay ``threshold_beta``) of each step's smallest selected activation
  (``running["min_selected"]`` of the training forward, the minimum over a step's chunks) once
  ``threshold_warmup_steps`` steps (at most half the run) are done, and :meth:`calibrate` sets
  it from ``calibration_tokens`` training tokens so that the inference L0 there is ``top_k``.
  Before theta exists (buffer ``threshold`` < 0) inference is a plain ReLU: such an SAE is not
  ready to ship (with ``calibrate_threshold``, ``needs_calibration`` is true and the trainer
  calibrates before it evaluates or saves). Those four fields are ``ThresholdOptions``
  (saes/threshold.py).
* SAELens export: ``jumprelu`` with theta as every latent's threshold (as SAELens saves its own
  BatchTopK SAEs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Optional

import torch
from torch import Tensor

from .registration import register
from ..architecture_options import ArchitectureOptions
from ..sparse_ops import topk_sae_forward
from .auxk import KSparseOptions, auxk_loss
from .base import SAE, SAELensFormat, TrainingProgress, TrainStepOutput
from .threshold import ThresholdOptions


@dataclass
class BatchTopKOptions(ThresholdOptions, KSparseOptions):
    """Fields of ``batchtopk``: ``top_k`` (mean active latents per token), ``top_k_aux`` and
    ``aux_penalty`` (see saes/auxk.py), and the threshold's warm-up, EMA decay and calibration
    (saes/threshold.py)."""


@register
class BatchTopKSAE(SAE):
    """BatchTopK SAE with AuxK and a calibrated fp32 inference threshold (module docstring)."""

    architecture: ClassVar[str] = "batchtopk"
    Options: ClassVar[type[ArchitectureOptions]] = BatchTopKOptions
    training_encoding_differs: ClassVar[bool] = True
    inference_rule: ClassVar[str] = (
        "a JumpReLU with one fp32 threshold for every latent, calibrated on training tokens so "
        "that the mean L0 there is top_k; each token is encoded on its own")

    @property
    def needs_calibration(self) -> bool:
        return bool(self.cfg.calibrate_threshold)

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
        """The training encoding of scaled tokens [N, d_in] (a ``TopKForward``; its ``x_hat``
        is the dictionary's reconstruction in the output space)."""
        return topk_sae_forward(xs, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k,
                                b_in=self.input_bias())

    def training_forward(self, x: Tensor, target: Optional[Tensor] = None) -> TrainStepOutput:
        xs, ys = self.scaled_pair(x, target)
        out = self.selection(xs)
        output = self._with_skip(xs, out.x_hat)
        return self._output(xs, ys, out, output, (output - ys).pow(2).mean(), {})

    def _with_skip(self, xs: Tensor, decoded: Tensor) -> Tensor:
        skip = self.skip_scaled(xs)
        return decoded if skip is None else decoded + skip

    def _output(self, xs: Tensor, ys: Tensor, out, output: Tensor, reconstruction: Tensor,
                extra_terms: dict[str, Tensor]) -> TrainStepOutput:
        n = xs.shape[0]
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
        fired[out.latent_idx] = True
        values = out.values.detach()
        aux = auxk_loss(self, xs, ys, output, out.pre_acts)
        mse = (output - ys).pow(2).mean().detach()
        running = {"min_selected": values.min().float()} if values.numel() else {}
        return TrainStepOutput(
            target_scaled=ys, output=output, reconstruction_loss=reconstruction,
            sparsity_loss=self.cfg.aux_penalty * aux,
            terms={"mse": mse, "aux": aux.detach(), **extra_terms},
            fired=fired, l0=torch.tensor(values.numel() / max(n, 1)), running=running)

    @torch.no_grad()
    def update_running_statistics(self, running: dict[str, Tensor],
                                  progress: TrainingProgress) -> None:
        """The fp32 EMA (decay ``threshold_beta``) of the smallest selected activation, from
        the step after ``threshold_start`` on (the warm-up, capped at half the run)."""
        options = self.cfg.options
        if progress.step <= options.threshold_start(progress.total_steps):
            return
        if "min_selected" not in running:
            return
        beta = float(options.threshold_beta)
        m = running["min_selected"].float().to(self.threshold.device)
        ema = beta * self.threshold + (1.0 - beta) * m
        self.threshold.copy_(torch.where(self.threshold < 0, m, ema))

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor], max_tokens: Optional[int] = None,
                  chunk_candidates: int = 2) -> Optional[str]:
        """Set theta so that ``top_k`` x n_tokens activations of ``batches`` exceed it (exactly,
        ties aside), i.e. the inference L0 on these tokens is ``top_k``.

        ``batches``: iterable of raw [n, d_in] input tensors, consumed up to ``max_tokens``
        tokens (None: the ``calibration_tokens`` option).
        Each batch contributes its ``chunk_candidates x top_k x n`` largest activations as
        candidates; if a batch might hold more of the global top than that, the pass is
        repeated with 4x more candidates. Returns a description, or None without data.
        """
        if max_tokens is None:
            max_tokens = int(self.cfg.calibration_tokens)
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
