"""trainer: SAE models, their configs, metrics, save/load/export and the training loop.

Public API (everything else in this package is internal):

    SAEConfig, TrainingConfig, TrainJobConfig          -- configs (StrictConfig)
    SAE, BatchTopKSAE, SAE_REGISTRY, build_sae, load_sae  -- the models
    MetricsRecord                                       -- one record per evaluation
    ActivationSource, TensorSource                      -- where activations come from
    Reporter, ConsoleReporter                           -- the logging seam
    Objective, LocalObjective, StepOutput               -- what a training step computes
    train_sae, TrainResult, train_from_yaml             -- training
    export_saelens                                      -- SAELens format
    resolve_device, to_device                           -- auto|cpu|cuda|cuda:N; batches to it
    EndToEndObjective, SequenceSource, evaluate_sae_dir -- the SAE spliced into the live model:
    end_to_end_sources, load_cache_model                   KL / block-MSE training, CE/KL metrics
    DimensionMismatchError, NonFiniteActivationError, EmptySourceError,
    TrainingDivergedError, CheckpointMismatchError      -- user errors (activation_cache.UserError)
"""

from .batchtopk import BatchTopKSAE
from .device import resolve_device, to_device
from .end_to_end import EndToEndObjective, SequenceSource, end_to_end_sources, load_cache_model
from .errors import (CheckpointMismatchError, DimensionMismatchError, EmptySourceError,
                     NonFiniteActivationError, TrainingDivergedError)
from .eval_job import evaluate_sae_dir
from .job import TrainJobConfig, train_from_yaml
from .metrics import MetricsRecord
from .objective import LocalObjective, Objective, StepOutput
from .registry import SAE_REGISTRY, build_sae, load_sae
from .reporting import ConsoleReporter, Reporter
from .sae import SAE
from .sae_config import SAEConfig
from .saelens_export import export_saelens
from .sources import ActivationSource, TensorSource
from .training import TrainResult, train_sae
from .training_config import TrainingConfig

__all__ = [
    "SAEConfig", "TrainingConfig", "TrainJobConfig",
    "SAE", "BatchTopKSAE", "SAE_REGISTRY", "build_sae", "load_sae",
    "MetricsRecord",
    "ActivationSource", "TensorSource",
    "Reporter", "ConsoleReporter",
    "Objective", "LocalObjective", "StepOutput",
    "train_sae", "TrainResult", "train_from_yaml",
    "export_saelens",
    "resolve_device", "to_device",
    "EndToEndObjective", "SequenceSource", "evaluate_sae_dir", "end_to_end_sources",
    "load_cache_model",
    "DimensionMismatchError", "NonFiniteActivationError", "EmptySourceError",
    "TrainingDivergedError",
    "CheckpointMismatchError",
]
