"""The ``end_to_end`` evaluator: the shipped SAE spliced into the live model -- CE clean /
spliced / zero-ablated, CE delta and score, KL(clean || spliced) over real tokens, top-1
agreement, downstream block MSE.

The maths lives with the end-to-end objective (trainer/end_to_end.py,
``EndToEndObjective.evaluate``: one pass over whole windows of the split computes these and the
reconstruction of the same tokens); this evaluator declares the fields and takes them from that
pass (``ctx.objective_figures()``). It needs the end-to-end objective
(``training.use_end_to_end``: the cache's model, identity-checked, and its clean logits), and is
on by default for every such job.
"""

from __future__ import annotations

from typing import Any

from .base import EvaluationContext, EvaluationData, Evaluator, EvaluatorDataError, MetricField
from .registration import register_evaluator


@register_evaluator
class EndToEndEvaluator(Evaluator):
    """CE/KL of the spliced model (module docstring)."""

    name = "end_to_end"
    description = "the SAE spliced into the live model: CE and KL(clean || spliced)"
    needs = ("end_to_end",)
    order = 10
    fields = (
        MetricField("ce_loss_clean", "next-token CE of the clean model (nats)"),
        MetricField("ce_loss_spliced", "... with the SAE spliced in", "lower"),
        MetricField("ce_loss_zero_ablation", "... with the hook zeroed on the same tokens"),
        MetricField("ce_loss_delta", "spliced - clean", "lower"),
        MetricField("ce_loss_score", "(zero - spliced) / (zero - clean); 1 = lossless",
                    "higher"),
        MetricField("kl_div", "KL(clean || spliced), nats per token", "lower"),
        MetricField("top1_agreement", "argmax spliced == argmax clean", "higher"),
        MetricField("block_mse", "downstream block MSE (scaled units)", "lower"),
    )

    @classmethod
    def enabled_by_default(cls, config: Any) -> bool:
        return bool(getattr(config, "use_end_to_end", False))

    def prepare(self, data: EvaluationData) -> None:
        if not getattr(data.config, "use_end_to_end", False):
            raise EvaluatorDataError(
                "evaluator end_to_end needs the end-to-end objective (the cache's model and "
                "clean logits): set training.use_end_to_end: true, or drop end_to_end from "
                "training.evaluators")

    def evaluate(self, sae: Any, ctx: EvaluationContext) -> dict[str, Any]:
        mine = set(self.field_names())
        return {k: v for k, v in ctx.objective_figures().items() if k in mine}
