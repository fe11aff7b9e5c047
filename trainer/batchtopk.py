"""BatchTopKSAE: BatchTopK sparsity, the AuxK dead-latent loss and a learned inference threshold.

* **Training encoding** (``sae.train()``): over the whole flattened batch (every non-feature
  dimension) keep the ``top_k x n_tokens`` largest ReLU'd pre-activations (encoder bias
  included). The hot path is ``trainer.sparse_ops.topk_sae_forward``.
* **Inference encoding** (``sae.eval()``): a JumpReLU with one global threshold theta,
  ``f = relu(pre) * (pre > theta)``, so a token's code does not depend on its batch. theta is an
  fp32 EMA of the smallest selected activation per training batch, started only after the
  threshold warm-up (earlier minima are meaningless), and optionally calibrated on held-out
  tokens at the end of training (``calibrate_threshold``) so that the inference L0 is top_k.
  Before theta exists (buffer ``threshold`` < 0) inference falls back to a plain ReLU.
* **AuxK**: latents idle for ``n_batches_to_dead`` batches are dead. Per token, the
  ``top_k_aux`` largest dead pre-activations (ReLU'd) reconstruct the detached residual
  ``e = x - x_hat`` through the decoder (no bias):
  ``aux = mean_t ||e_t - e_hat_t||^2 / mean_t ||e_t - mean(e)||^2``. Normalising by the
  residual's variance makes ``aux_penalty`` scale-free; it is exactly 0 when nothing is dead.
"""

from __future__ import annotations

from typing import ClassVar, Iterable, Optional

import torch
from torch import Tensor

from .sae import SAE
from .sae_config import SAEConfig
from .sparse_ops import auxk_reconstruct, topk_sae_forward


class BatchTopKSAE(SAE):
    """BatchTopK SAE with AuxK and a learned fp32 inference threshold.

    ``architecture: batchtopk``; see the module docstring.
    """

    architecture: ClassVar[str] = "batchtopk"

    def __init__(self, cfg: SAEConfig, *, seed: Optional[int] = None):
        super().__init__(cfg, seed=seed)  # checks the architecture (then top_k is set)
        self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float32,
                                                     device=self.device))
        self._last_min_selected: Optional[Tensor] = None

    @property
    def k(self) -> int:
        return int(self.cfg.top_k)  # type: ignore[arg-type]

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Training mode: BatchTopK over all tokens of ``x``; eval mode: per-token JumpReLU."""
        xs = self.scale_input(x)
        if not self.training:
            return self.encode_with_threshold(xs)
        flat = xs.reshape(-1, self.cfg.d_in)
        out = topk_sae_forward(flat, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k)
        dense = flat.new_zeros(flat.shape[0], self.cfg.d_sae)
        dense[out.token_idx, out.latent_idx] = out.values
        return dense.reshape(*xs.shape[:-1], self.cfg.d_sae)

    def encode_with_threshold(self, x_scaled: Tensor) -> Tensor:
        pre = self.pre_activations(x_scaled)
        theta = self.threshold.clamp_min(0).to(pre.dtype)
        return torch.relu(pre) * (pre > theta)

    # -- training ------------------------------------------------------------------------------
    def training_forward(self, x: Tensor) -> dict[str, Tensor]:
        """Loss terms of one training batch (see ``SAE.training_forward``); ``aux`` is AuxK,
        ``l1`` is 0. Also remembers the smallest selected activation for the threshold."""
        xs = self.scale_input(x).reshape(-1, self.cfg.d_in)
        n = xs.shape[0]
        out = topk_sae_forward(xs, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k)
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
        fired[out.latent_idx] = True
        values = out.values.detach()
        self._last_min_selected = values.min() if values.numel() else None
        aux = self.get_auxiliary_loss(xs, out.x_hat, self.dead_mask(), pre_acts=out.pre_acts)
        return {
            "mse": (out.x_hat - xs).pow(2).mean(),
            "l1": xs.new_zeros(()),
            "aux": aux,
            "x_hat": out.x_hat,
            "x_scaled": xs,
            "fired": fired,
            "l0": torch.tensor(values.numel() / max(n, 1)),
        }

    def get_auxiliary_loss(self, x: Tensor, x_recon: Tensor,
                           dead_mask: Optional[Tensor] = None,
                           pre_acts: Optional[Tensor] = None) -> Tensor:
        """AuxK loss (module docstring) for scaled inputs ``x`` [N, d_in] and their
        reconstruction ``x_recon``; ``dead_mask`` defaults to ``self.dead_mask()``;
        ``pre_acts`` (detached [N, d_sae]) saves recomputing the encoder pre-activations."""
        if dead_mask is None:
            dead_mask = self.dead_mask()
        dead_idx = torch.nonzero(dead_mask).flatten()
        n_dead = dead_idx.numel()
        if n_dead == 0 or self.cfg.top_k_aux is None:
            return x.new_zeros(())
        x = x.reshape(-1, self.cfg.d_in)
        residual = (x - x_recon.reshape_as(x)).detach()
        if pre_acts is None:
            with torch.no_grad():
                pre_acts = self.pre_activations(x)
        # gradient to the encoder and decoder through the dead latents only
        recon = auxk_reconstruct(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                 pre_acts.reshape(-1, self.cfg.d_sae), dead_mask,
                                 int(self.cfg.top_k_aux)).e_hat
        err = (residual - recon).pow(2).sum(-1).mean()
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        return err / variance.clamp_min(torch.finfo(variance.dtype).tiny)

    @torch.no_grad()
    def update_training_state(self, fired: Tensor, *, update_threshold: bool = False,
                              threshold_beta: float = 0.999) -> None:
        """Dead tracking, plus (when ``update_threshold``) the fp32 EMA of the threshold. The
        minimum of the last ``training_forward`` enters the EMA once: a step without a forward
        (no usable tokens) leaves the threshold alone."""
        super().update_inactive_features(fired)
        if update_threshold and self._last_min_selected is not None:
            m = self._last_min_selected.float()
            self._last_min_selected = None
            ema = threshold_beta * self.threshold + (1.0 - threshold_beta) * m
            self.threshold.copy_(torch.where(self.threshold < 0, m, ema))

    @torch.no_grad()
    def calibrate_threshold(self, batches: Iterable[Tensor], max_tokens: int,
                            chunk_candidates: int = 2) -> Optional[float]:
        """Set theta so that ``top_k`` x n_tokens activations of ``batches`` exceed it (exactly,
        ties aside), i.e. the inference L0 on these tokens is ``top_k``.

        ``batches``: iterable of raw [n, d_in] tensors, consumed up to ``max_tokens`` tokens.
        Each batch contributes its ``chunk_candidates x top_k x n`` largest activations as
        candidates; if a batch might hold more of the global top than that, the pass is
        repeated with 4x more candidates. Returns the new theta, or None without data.
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
        return float(self.threshold)
