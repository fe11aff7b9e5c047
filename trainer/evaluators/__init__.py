"""Evaluators: plug-ins that each add named figures of the shipped SAE to the metrics record.

The seam is documented in ``trainer/evaluators/base.py``. One file per evaluator:

    reconstruction.py   reconstruction   (mse, fvu, explained_variance, l0, dead/dense, ...)
    end_to_end.py       end_to_end       (CE clean/spliced/zero, delta, score, KL, top-1)
    ground_truth.py     ground_truth     (feature_mcc, feature_recall_0.9 on synthetic caches)
    probing.py          probing          (probe_accuracy_k1..k20, _raw, _ratio_k*: sparse probing)

Importing a module registers its evaluator; add a new one's import below.
"""

from .base import (DATA_NEEDS, EvaluationContext, EvaluationData, Evaluator,
                   EvaluatorDataError, MetricField)
from .registration import register_evaluator
from . import reconstruction, end_to_end, ground_truth, probing  # noqa: F401,E402  (they register)
from .registry import (EvaluationSuite, apply_figures, check_evaluator_names, declared_fields,
                       evaluator_class, evaluator_names, extra_metric_names, headline_metric_names, field_evaluator,
                       final_only_metric_names, objective_metric_names, resolve_evaluators)

__all__ = [
    "DATA_NEEDS", "EvaluationContext", "EvaluationData", "Evaluator", "EvaluatorDataError",
    "MetricField", "register_evaluator", "EvaluationSuite", "apply_figures",
    "check_evaluator_names", "declared_fields", "evaluator_class", "evaluator_names",
    "extra_metric_names", "headline_metric_names", "field_evaluator", "final_only_metric_names",
    "objective_metric_names", "resolve_evaluators",
]
