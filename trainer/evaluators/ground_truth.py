"""The ``ground_truth`` evaluator: recovery of a synthetic cache's known feature directions.

(The maths arrives in the next commit; the fields are declared so the seam is complete.)
"""

from __future__ import annotations

from typing import Any

from .base import EvaluationContext, EvaluationData, Evaluator, EvaluatorDataError, MetricField
from .registration import register_evaluator


@register_evaluator
class GroundTruthEvaluator(Evaluator):
    name = "ground_truth"
    description = "recovery of a synthetic cache's true feature directions by the decoder"
    needs = ("ground_truth", "decoder")
    fields = (
        MetricField("feature_mcc", "mean over true features of |cos| to the matched decoder "
                    "row (one-to-one Hungarian matching)", "higher"),
        MetricField("feature_recall_0.9", "share of true features matched at |cos| > 0.9",
                    "higher"),
    )

    def prepare(self, data: EvaluationData) -> None:
        raise EvaluatorDataError("evaluator ground_truth: not implemented yet")

    def evaluate(self, sae: Any, ctx: EvaluationContext) -> dict[str, Any]:
        return {}
