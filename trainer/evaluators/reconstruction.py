"""The ``reconstruction`` evaluator: reconstruction metrics of the shipped encoder on a split's
token activations (raw units). It runs for every job.

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

from ..metrics import ReconstructionAccumulator, density_summary
from ..saes.base import SAE
from ..sources import ActivationSource
from .base import EvaluationContext, Evaluator, MetricField
from .registration import register_evaluator


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


@register_evaluator
class ReconstructionEvaluator(Evaluator):
    """Reconstruction of the split's tokens by the shipped encoder (module docstring).

    Its figures come from the objective's own evaluation pass (``ctx.objective_figures()``):
    :func:`evaluate_reconstruction` on the split's token rows (the local objective), or on the
    train-mask rows of exactly the windows the end-to-end pass spliced (an end-to-end
    objective), so both evaluators of an end-to-end job score the same tokens."""

    name = "reconstruction"
    description = "reconstruction of the split's tokens by the shipped encoder"
    needs = ("tokens",)
    order = 0
    fields = (
        MetricField("eval_tokens", "train-mask tokens evaluated", bookkeeping=True),
        MetricField("mse", "reconstruction MSE (raw units, shipped encoder)", "lower"),
        MetricField("fvu", "fraction of variance unexplained", "lower"),
        MetricField("explained_variance", "1 - FVU", "higher"),
        MetricField("l0", "active latents per token (shipped encoder)"),
        MetricField("l0_train", "active latents per token (training encoding)"),
        MetricField("mse_train", "MSE of the training encoding (batch-level)", "lower"),
        MetricField("fvu_train", "FVU of the training encoding (batch-level)", "lower"),
        MetricField("explained_variance_train", "1 - fvu_train", "higher"),
        MetricField("dead_fraction", "latents that never fired here", "lower"),
        MetricField("dense_fraction", "latents firing on > 10% of tokens", "lower"),
        MetricField("density_histogram", "live latents per decade of firing frequency",
                    numeric=False),
    )

    @classmethod
    def enabled_by_default(cls, config: object) -> bool:
        return True

    def evaluate(self, sae: SAE, ctx: EvaluationContext) -> dict[str, Any]:
        mine = set(self.field_names())
        return {k: v for k, v in ctx.objective_figures().items() if k in mine}
