"""trainer: SAE models, their configs, metrics, save/load/export and the training loop.

Public API (everything else in this package is internal):

    SAEConfig, TrainingConfig, TrainJobConfig          -- configs (StrictConfig)
    SAE (abstract base), TrainStepOutput, SAELensFormat -- the architecture seam
    StandardSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE,
    MatryoshkaBatchTopKSAE                              -- the registered architectures
    SAE_REGISTRY, build_sae, load_sae, register,
    architecture_names, architecture_fields,
    searchable_fields, width_capped_fields, common_sae_fields -- the registry (what the sweep asks)
    metric_names                                        -- numeric MetricsRecord fields
    MetricsRecord                                       -- one record per evaluation
    ActivationSource, TensorSource                      -- where activations come from
    Reporter, ConsoleReporter                           -- the logging seam
    Objective, LocalObjective, StepOutput               -- what a training step computes
    train_sae, TrainResult, train_from_yaml             -- training
    export_sae, export_saelens, load_saelens,
    load_sae_folder, SAELensFormatError                 -- the one export path (SAELens or native +
                                                           card); reading either format back
    cache_facts, render_model_card, figures_text        -- the README.md card and closing lines
    check_output_folder, claim_output_folder,
    atomic_directory, OutputFolderError                 -- writers replace only their own outputs
    resolve_device, to_device                           -- auto|cpu|cuda|cuda:N; batches to it
    EndToEndObjective, SequenceSource, evaluate_sae_dir -- the SAE spliced into the live model:
    end_to_end_sources, load_cache_model                   KL / block-MSE training, CE/KL metrics
    TwoPhaseObjective, PhasedSource                     -- local, then an end-to-end fine-tune
    job_sources, JobSources, evaluate_split             -- a job's objective and split sources
    DimensionMismatchError, NonFiniteActivationError, EmptySourceError,
    TrainingDivergedError, CheckpointMismatchError      -- user errors (activation_cache.UserError)
"""

from .device import resolve_device, to_device
from .end_to_end import EndToEndObjective, SequenceSource, end_to_end_sources, load_cache_model
from .finetune import PhasedSource, TwoPhaseObjective
from .job_sources import JobSources, job_sources
from .errors import (CheckpointMismatchError, DimensionMismatchError, EmptySourceError,
                     NonFiniteActivationError, TrainingDivergedError)
from .eval_job import evaluate_sae_dir, evaluate_split
from .job import TrainJobConfig, train_from_yaml
from .metrics import MetricsRecord, numeric_metric_names as metric_names
from .objective import LocalObjective, Objective, StepOutput
from .registry import (SAE_REGISTRY, architecture_names, architectures_with_field, build_sae,
                       load_sae, register, searchable_fields, width_capped_fields)
from .reporting import ConsoleReporter, Reporter
from .sae_config import SAEConfig, common_field_names as common_sae_fields
from .saes import SAE, SAELensFormat, TrainStepOutput
from .saes.batchtopk import BatchTopKSAE
from .saes.jumprelu import JumpReLUSAE
from .saes.matryoshka import MatryoshkaBatchTopKSAE
from .saes.standard import StandardSAE
from .saes.topk import TopKSAE
from .model_card import cache_facts, figures_text, render_model_card
from .output_folder import (OutputFolderError, atomic_directory, check_output_folder,
                            claim_output_folder)
from .saelens_export import (SAELensFormatError, export_sae, export_saelens, load_sae_folder,
                             load_saelens)
from .sources import ActivationSource, TensorSource
from .training import TrainResult, train_sae
from .training_config import TrainingConfig


def architecture_fields(name: str) -> tuple[str, ...]:
    """The config fields architecture ``name`` owns (its options)."""
    from .registry import options_class

    return options_class(name).field_names()

__all__ = [
    "SAEConfig", "TrainingConfig", "TrainJobConfig",
    "SAE", "TrainStepOutput", "SAELensFormat",
    "StandardSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "MatryoshkaBatchTopKSAE",
    "SAE_REGISTRY", "build_sae", "load_sae", "register", "architecture_names",
    "architecture_fields", "architectures_with_field", "searchable_fields",
    "width_capped_fields", "common_sae_fields",
    "MetricsRecord", "metric_names",
    "ActivationSource", "TensorSource",
    "Reporter", "ConsoleReporter",
    "Objective", "LocalObjective", "StepOutput",
    "train_sae", "TrainResult", "train_from_yaml",
    "export_sae", "export_saelens", "load_saelens", "load_sae_folder", "SAELensFormatError",
    "cache_facts", "render_model_card", "figures_text",
    "check_output_folder", "claim_output_folder", "atomic_directory", "OutputFolderError",
    "resolve_device", "to_device",
    "EndToEndObjective", "SequenceSource", "evaluate_sae_dir", "evaluate_split", "end_to_end_sources",
    "load_cache_model", "TwoPhaseObjective", "PhasedSource", "JobSources", "job_sources",
    "DimensionMismatchError", "NonFiniteActivationError", "EmptySourceError",
    "TrainingDivergedError",
    "CheckpointMismatchError",
]
