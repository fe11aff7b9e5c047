"""The ``ground_truth`` evaluator: how well the decoder recovers a synthetic cache's known
feature directions (activation_cache/synthetic.py; ``CacheReader.ground_truth()``).

With the true unit directions ``D`` [n_features, d] and the shipped SAE's decoder rows ``W``
[d_sae, d] (each normalised; a dead, all-zero row has cosine 0 with everything), the cosine
matrix is ``C = |D W^T / (||D_i|| ||W_j||)|`` (absolute: a feature and its negation are the
same direction up to the sign of the code). A **one-to-one** matching of true features to
latents maximising the total |cosine| is found with the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``); with fewer latents than features the unmatched
features score 0. Then

* ``feature_mcc`` = mean over the **true features** of their matched |cosine| (1: every
  feature has its own latent along its direction);
* ``feature_recall_0.9`` = share of true features whose matched |cosine| exceeds 0.9.

Both depend only on the decoder (not on a split's tokens), so the val and test figures agree.
The evaluator needs a synthetic cache, and an SAE that reconstructs the hook the truth
describes (width ``d``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .base import EvaluationContext, EvaluationData, Evaluator, EvaluatorDataError, MetricField
from .registration import register_evaluator

RECALL_THRESHOLD = 0.9
"""``feature_recall_0.9`` counts matches above this |cosine|."""


def matched_cosines(true_directions: Tensor, decoder_rows: Tensor) -> Tensor:
    """float64 [n_features]: each true feature's |cosine| to the latent the one-to-one
    (Hungarian) matching gives it (0 for a feature left unmatched when d_sae < n_features)."""
    d = true_directions.detach().double().cpu()
    w = decoder_rows.detach().double().cpu()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (d @ w.T).abs().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    out = np.zeros(d.shape[0], dtype=np.float64)
    out[rows] = cos[rows, cols]
    return torch.from_numpy(out)


def recovery_metrics(true_directions: Tensor, decoder_rows: Tensor) -> dict[str, float]:
    """``feature_mcc`` and ``feature_recall_0.9`` of a decoder (module docstring)."""
    matched = matched_cosines(true_directions, decoder_rows)
    return {"feature_mcc": float(matched.mean()),
            "feature_recall_0.9": float((matched > RECALL_THRESHOLD).double().mean())}


@register_evaluator
class GroundTruthEvaluator(Evaluator):
    """Recovery of the known features by the decoder (module docstring)."""

    name = "ground_truth"
    description = "recovery of a synthetic cache's true feature directions by the decoder"
    needs = ("ground_truth", "decoder")
    fields = (
        MetricField("feature_mcc", "mean over true features of |cos| to the matched decoder "
                    "row (one-to-one Hungarian matching)", "higher", headline=True),
        MetricField("feature_recall_0.9", "share of true features matched at |cos| > 0.9",
                    "higher"),
    )

    def __init__(self) -> None:
        self.directions: Tensor | None = None

    def prepare(self, data: EvaluationData) -> None:
        reader = data.reader
        truth = reader.ground_truth() if reader is not None and hasattr(
            reader, "ground_truth") else None
        if truth is None:
            raise EvaluatorDataError(
                f"evaluator ground_truth needs a synthetic cache (its YAML's `synthetic:` "
                f"section stores the true features), but {data.cache_name()} holds no ground "
                "truth; drop ground_truth from training.evaluators or use a synthetic cache")
        target = data.target_hook or data.hook
        if target is not None and truth.hook and target != truth.hook:
            raise EvaluatorDataError(
                f"evaluator ground_truth: the truth of {data.cache_name()} describes hook "
                f"{truth.hook!r}, but the SAE reconstructs {target!r}")
        self.directions = truth.directions.float()

    def evaluate(self, sae: Any, ctx: EvaluationContext) -> dict[str, Any]:
        assert self.directions is not None, "prepare() was not called"
        w = sae.W_dec
        if w.shape[1] != self.directions.shape[1]:
            raise EvaluatorDataError(
                f"evaluator ground_truth: the true directions have width "
                f"{self.directions.shape[1]}, the decoder rows {w.shape[1]}")
        return recovery_metrics(self.directions, w)
