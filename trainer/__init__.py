"""trainer: SAE models, their configs, metrics, save/load/export and the training loop.

Public API (everything else in this package is internal):

    SAEConfig, TrainingConfig, TrainJobConfig          -- configs (StrictConfig)
    ArchitectureOptions                                 -- base of an architecture's own fields
    make_sae_config, sae_config_from_dict               -- flat SAE fields -> SAEConfig (registry)
    SAE (abstract base), TrainStepOutput, SAELensFormat,
    TrainingProgress, SAEDescription                    -- the architecture seam
    StandardSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE,
    MatryoshkaBatchTopKSAE, BatchTopKTranscoder,
    BatchTopKSkipTranscoder                             -- the registered architectures
    SAE_REGISTRY, build_sae, load_sae, register,
    architecture_names, describe_sae                    -- the registry
    field_catalog, FieldCatalog                         -- what the sweep asks: architectures,
                                                           fields, where a field belongs, metrics
    metric_names                                        -- what an objective may name: numeric
                                                           MetricsRecord fields + evaluators'
    Evaluator, MetricField, EvaluationData,
    EvaluationContext, EvaluationSuite,
    register_evaluator, evaluator_names,
    check_evaluator_names, EvaluatorDataError                                 -- the evaluator seam (trainer/evaluators/)
    MetricsRecord                                       -- one record per evaluation
    ActivationSource, TensorSource, TokenBatch          -- where activations come from: batches
                                                           of (input, target) token rows
    Reporter, ConsoleReporter                           -- the logging seam
    Objective, LocalObjective, StepOutput               -- what a training step computes
    train_sae, TrainResult, train_from_yaml             -- training
    export_sae, export_saelens, load_saelens,
    load_sae_folder, SAELensFormatError                 -- the one export path (SAELens or native +
                                                           card); reading either format back
    cache_facts, render_model_card, figures_text,
    CARD_METRICS                                        -- the README.md card and closing lines
    check_output_folder, claim_output_folder,
    atomic_directory, OutputFolderError                 -- writers replace only their own outputs
    resolve_device, to_device                           -- auto|cpu|cuda|cuda:N; batches to it
    EndToEndObjective, SequenceSource, evaluate_sae_dir -- the SAE spliced into the live model:
    load_cache_model                                       KL / block-MSE training, CE/KL metrics
    TwoPhaseObjective, PhasedSource                     -- local, then an end-to-end fine-tune
    job_sources, JobSources, evaluate_split             -- a job's objective and split sources
    PhaseTimer, timed_phase, active_timer,
    phase_column, time_columns, TRAINING_PHASES         -- where a run's wall time goes
    DimensionMismatchError, NonFiniteActivationError, EmptySourceError,
    TrainingDivergedError, CheckpointMismatchError      -- user errors (activation_cache.UserError)
"""

from .device import resolve_device, to_device
from .architecture_options import ArchitectureOptions
from .end_to_end import EndToEndObjective, SequenceSource, load_cache_model
from .finetune import PhasedSource, TwoPhaseObjective
from .job_sources import JobSources, job_sources
from .errors import (CheckpointMismatchError, DimensionMismatchError, EmptySourceError,
                     NonFiniteActivationError, TrainingDivergedError)
from .eval_job import evaluate_sae_dir, evaluate_split
from .job import TrainJobConfig, train_from_yaml
from .metrics import MetricsRecord
from .evaluators import (EvaluationContext, EvaluationData, EvaluationSuite, Evaluator,
                         EvaluatorDataError, MetricField, check_evaluator_names,
                         evaluator_names,
                         objective_metric_names as metric_names, register_evaluator)
from .objective import LocalObjective, Objective, StepOutput
from .fields import FieldCatalog, field_catalog
from .registry import (SAE_REGISTRY, architecture_names, build_sae, describe_sae, load_sae,
                       make_sae_config, register, sae_config_from_dict)
from .reporting import ConsoleReporter, Reporter
from .sae_config import SAEConfig
from .saes import SAE, SAEDescription, SAELensFormat, TrainingProgress, TrainStepOutput
from .saes.batchtopk import BatchTopKSAE
from .saes.batchtopk_transcoder import BatchTopKTranscoder
from .saes.skip_transcoder import BatchTopKSkipTranscoder
from .saes.jumprelu import JumpReLUSAE
from .saes.matryoshka import MatryoshkaBatchTopKSAE
from .saes.standard import StandardSAE
from .saes.topk import TopKSAE
from .model_card import CARD_METRICS, cache_facts, figures_text, render_model_card
from .output_folder import (OutputFolderError, atomic_directory, check_output_folder,
                            claim_output_folder)
from .saelens_export import (SAELensFormatError, export_sae, export_saelens, load_sae_folder,
                             load_saelens)
from .sources import ActivationSource, TensorSource, TokenBatch
from .timing import (TRAINING_PHASES, PhaseTimer, active_timer, phase_column, time_columns,
                     timed_phase)
from .training import TrainResult, train_sae
from .training_config import TrainingConfig

__all__ = [
    "SAEConfig", "TrainingConfig", "TrainJobConfig", "ArchitectureOptions",
    "make_sae_config", "sae_config_from_dict",
    "SAE", "TrainStepOutput", "SAELensFormat", "TrainingProgress", "SAEDescription",
    "StandardSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "MatryoshkaBatchTopKSAE",
    "BatchTopKTranscoder", "BatchTopKSkipTranscoder",
    "SAE_REGISTRY", "build_sae", "load_sae", "register", "architecture_names", "describe_sae",
    "field_catalog", "FieldCatalog",
    "MetricsRecord", "metric_names",
    "Evaluator", "MetricField", "EvaluationData", "EvaluationContext", "EvaluationSuite",
    "register_evaluator", "evaluator_names", "check_evaluator_names", "EvaluatorDataError",
    "ActivationSource", "TensorSource", "TokenBatch",
    "Reporter", "ConsoleReporter",
    "Objective", "LocalObjective", "StepOutput",
    "train_sae", "TrainResult", "train_from_yaml",
    "export_sae", "export_saelens", "load_saelens", "load_sae_folder", "SAELensFormatError",
    "cache_facts", "render_model_card", "figures_text", "CARD_METRICS",
    "check_output_folder", "claim_output_folder", "atomic_directory", "OutputFolderError",
    "resolve_device", "to_device",
    "EndToEndObjective", "SequenceSource", "evaluate_sae_dir", "evaluate_split",
    "load_cache_model", "TwoPhaseObjective", "PhasedSource", "JobSources", "job_sources",
    "DimensionMismatchError", "NonFiniteActivationError", "EmptySourceError",
    "TrainingDivergedError",
    "CheckpointMismatchError",
    "PhaseTimer", "timed_phase", "active_timer", "phase_column", "time_columns",
    "TRAINING_PHASES",
]
