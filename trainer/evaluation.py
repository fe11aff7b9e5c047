"""Reconstruction metrics of an SAE on a source of token activations (raw units)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .batchtopk import BatchTopKSAE
from .metrics import ReconstructionAccumulator, density_summary
from .sae import SAE
from .sources import ActivationSource
from .sparse_ops import topk_sae_forward


@torch.no_grad()
def evaluate_reconstruction(sae: SAE, source: ActivationSource, *, max_tokens: Optional[int],
                            batch_tokens: int, seed: int = 0) -> dict[str, Any]:
    """mse / fvu / explained_variance, both L0s, dead / dense fractions and the density histogram
    (see trainer.metrics for the definitions) over the first ``max_tokens`` tokens of ``source``.

    The primary fields use the training encoding (BatchTopK over batches of ``batch_tokens``);
    ``*_inference`` fields use the per-token inference encoding. Vanilla SAEs have one encoding.
    """
    train_acc, inf_acc = ReconstructionAccumulator(), ReconstructionAccumulator()
    fire_counts = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=sae.W_enc.device)
    n_tokens, l0_train, l0_inf = 0, 0.0, 0.0
    is_topk = isinstance(sae, BatchTopKSAE)
    scale = sae.input_scale
    for batch in source.iter_batches(batch_tokens, seed=seed, epoch=0):
        if max_tokens is not None:
            batch = batch[: max_tokens - n_tokens]
        if batch.shape[0] == 0:
            break
        batch = batch.to(sae.W_enc.device)
        xs = sae.scale_input(batch)
        if is_topk:
            out = topk_sae_forward(xs, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.k)
            x_hat_raw = out.x_hat.float() / scale  # the kernel reconstructs in scaled space
            fire_counts += torch.bincount(out.latent_idx, minlength=sae.cfg.d_sae)
            l0_train += out.values.numel()
            f_inf = sae.encode_with_threshold(xs)
            l0_inf += float((f_inf > 0).sum())
            inf_acc.add(batch, sae.decode(f_inf).float())
        else:
            f = torch.relu(sae.pre_activations(xs))
            x_hat_raw = sae.decode(f).float()
            active = f > 0
            fire_counts += active.sum(0)
            l0_train += float(active.sum())
        train_acc.add(batch, x_hat_raw)
        n_tokens += batch.shape[0]
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    if n_tokens == 0:
        return {}
    out_metrics: dict[str, Any] = {"eval_tokens": n_tokens, **train_acc.result()}
    out_metrics["l0_train"] = l0_train / n_tokens
    if is_topk:
        inf = inf_acc.result()
        out_metrics["l0_inference"] = l0_inf / n_tokens
        out_metrics["mse_inference"] = inf["mse"]
        out_metrics["explained_variance_inference"] = inf["explained_variance"]
    else:
        out_metrics["l0_inference"] = out_metrics["l0_train"]
        out_metrics["mse_inference"] = out_metrics["mse"]
        out_metrics["explained_variance_inference"] = out_metrics["explained_variance"]
    out_metrics.update(density_summary(fire_counts.cpu(), n_tokens))
    return out_metrics
