"""Reconstruction metrics of an SAE on a source of token activations (raw units).

The headline figures use the **shipped encoder**: ``sae(x)`` (encode, decode and a skip path if
any), exactly what ``export`` writes (BatchTopK: the calibrated per-token threshold), scored
against each batch's **target** (an SAE: its input; a transcoder: the output hook's rows).
When an architecture trains with a different, batch-level encoding
(``training_encoding_differs``), the same tokens also get that encoding's figures under
``*_train`` names, for diagnosis only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .metrics import ReconstructionAccumulator, density_summary
from .saes.base import SAE
from .sources import ActivationSource


@torch.no_grad()
def evaluate_reconstruction(sae: SAE, source: ActivationSource, *, max_tokens: Optional[int],
                            batch_tokens: int, seed: int = 0) -> dict[str, Any]:
    """mse / fvu / explained_variance / l0 / dead and dense fractions / density histogram of the
    shipped encoder (see trainer.metrics for the definitions) over the first ``max_tokens``
    tokens of ``source`` (in ``(seed, epoch 0)`` order), plus ``l0_train`` and, for
    architectures whose training encoding differs, ``mse_train`` / ``fvu_train`` /
    ``explained_variance_train`` (the training encoding over batches of ``batch_tokens``)."""
    shipped, train_acc = ReconstructionAccumulator(), ReconstructionAccumulator()
    fire_counts = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=sae.W_enc.device)
    n_tokens, l0, l0_train = 0, 0.0, 0.0
    differs = sae.training_encoding_differs
    was_training = sae.training
    sae.eval()
    try:
        for batch in source.iter_batches(batch_tokens, seed=seed, epoch=0):
            if max_tokens is not None:
                batch = batch.rows(slice(0, max_tokens - n_tokens))
            if batch.input.shape[0] == 0:
                break
            batch = batch.to(sae.W_enc.device)
            y_hat, f = sae(batch.input)
            active = f > 0
            fire_counts += active.sum(0)
            l0 += float(active.sum())
            shipped.add(batch.target, y_hat.float())
            if differs:
                out = sae.training_forward(batch.input, batch.target)
                train_acc.add(batch.target, sae.unscale_output(out.output.float()))
                l0_train += float(out.l0) * batch.input.shape[0]
            n_tokens += batch.input.shape[0]
            if max_tokens is not None and n_tokens >= max_tokens:
                break
    finally:
        sae.train(was_training)
    if n_tokens == 0:
        return {}
    metrics: dict[str, Any] = {"eval_tokens": n_tokens, **shipped.result()}
    metrics["l0"] = l0 / n_tokens
    if differs:
        train = train_acc.result()
        metrics["l0_train"] = l0_train / n_tokens
        metrics["mse_train"] = train["mse"]
        metrics["fvu_train"] = train["fvu"]
        metrics["explained_variance_train"] = train["explained_variance"]
    else:
        metrics["l0_train"] = metrics["l0"]
    metrics.update(density_summary(fire_counts.cpu(), n_tokens))
    return metrics
