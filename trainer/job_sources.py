"""What a training job on a cache trains on: the objective and a source per split.

``job_sources`` picks, from the TrainingConfig alone (never from the architecture):

* local training (the default): ``LocalObjective`` (None: the loop's default) on shuffled token
  rows of each split;
* ``use_end_to_end``: ``EndToEndObjective`` on whole windows (``SequenceSource``), on the model
  the cache was built from (loaded and identity-checked);
* ``use_end_to_end`` with ``finetune_fraction > 0``: ``TwoPhaseObjective`` on ``PhasedSource``s
  (both views of each split).

``sae-sweep train`` and every sweep trial build their sources here, so both behave the same.
The evaluators ``config.evaluators`` names are prepared here too (``JobSources.evaluators``),
so an evaluator whose data the cache lacks is a one-line error before the model loads or
training starts.
A split the cache does not hold comes back as None. ``target_hook`` is the hook the SAE
reconstructs (a transcoder's output hook, e.g. ``blocks.6.hook_mlp_out``; None: ``hook``):
token rows then carry both hooks' rows of the same tokens, whole windows both hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .timing import timed_phase
from .training_config import TrainingConfig


@dataclass
class JobSources:
    objective: Any
    """The objective to pass to ``train_sae`` (None: the default local objective)."""
    train: Any
    val: Optional[Any]
    test: Optional[Any]
    evaluators: Any = None
    """The job's ``EvaluationSuite`` (trainer/evaluators/): ``config.evaluators`` prepared on
    this cache -- pass it to ``train_sae`` and ``evaluate_split``."""


def job_sources(reader: Any, config: TrainingConfig, hook: str, *, train_split: str = "train",
                val_split: Optional[str] = "val", test_split: Optional[str] = "test",
                model: Any = None, device: Any = None,
                target_hook: Optional[str] = None) -> JobSources:
    """The objective and the sources of a job on the cache ``reader`` (module docstring).

    ``device``: where the SAE trains. On a GPU the training token rows come as the cache
    stores them (fp16/bf16, half the bytes) in pinned memory and are converted on the device."""
    on_gpu = device is not None and torch.device(device).type == "cuda"
    splits = reader.manifest.get("splits", {})

    def have(split: Optional[str]) -> Optional[str]:
        return split if split is not None and split in splits else None

    val_split, test_split = have(val_split), have(test_split)
    if target_hook == hook:
        target_hook = None
    from .evaluators import EvaluationSuite

    def suite(objective: Any) -> Any:
        return EvaluationSuite.build(config, reader=reader, hook=hook, target_hook=target_hook,
                                     objective=objective)

    suite(None)  # checks the evaluators' data before anything is loaded

    def tokens(split: Optional[str], **kw: Any) -> Any:
        if target_hook is not None:
            kw["target_hook"] = target_hook
        return None if split is None else reader.token_source(hook, split, **kw)

    if not config.use_end_to_end:
        train = (tokens(train_split, dtype=None, pin_memory=True) if on_gpu
                 else tokens(train_split))
        return JobSources(None, train, tokens(val_split), tokens(test_split), suite(None))

    from .end_to_end import EndToEndObjective, SequenceSource, load_cache_model

    with timed_phase("model_load"):
        model = model if model is not None else load_cache_model(reader)
        if device is not None:  # the live passes run where the SAE trains
            model = model.to(device, print_details=False)

    def windows(split: Optional[str], shuffle: bool = False) -> Any:
        return None if split is None else SequenceSource(reader, split, hook,
                                                         target_hook=target_hook, shuffle=shuffle)

    if config.finetune_fraction <= 0:
        objective = EndToEndObjective(model, config)
        return JobSources(objective, windows(train_split, True), windows(val_split),
                          windows(test_split), suite(objective))
    from .finetune import PhasedSource, TwoPhaseObjective

    def both(split: Optional[str], shuffle: bool = False) -> Any:
        if split is None:
            return None
        return PhasedSource(tokens(split), windows(split, shuffle))

    objective = TwoPhaseObjective(model, config)
    return JobSources(objective, both(train_split, True), both(val_split), windows(test_split),
                      suite(objective))
