"""``sae-sweep eval``: every metric of a saved SAE on a cache split, spliced into its model
(on a synthetic cache, which has no model: reconstruction and the ground truth's recovery).

``evaluate_sae_dir`` loads the SAE (a native folder -- ``config.json`` + ``weights.safetensors`` --
or a SAELens export -- ``cfg.json`` + ``sae_weights.safetensors``: ``load_sae_folder``), the cache,
and the model the cache was built from (its manifest's ModelSpec, identity-checked), then computes
the reconstruction metrics and the end-to-end ones (CE clean / spliced / zero-ablated, CE delta
and score, KL(clean ‖ spliced), top-1 agreement; see ``EndToEndObjective.evaluate``) on the same
windows, prints them as a table or JSON and returns the MetricsRecord.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any, Optional

from activation_cache import ConfigError

from .evaluators import EvaluationSuite, apply_figures, declared_fields
from .end_to_end import EndToEndObjective, SequenceSource, load_cache_model
from .metrics import MetricsRecord
from .saelens_export import load_sae_folder
from .timing import timed_phase
from .saes.base import SAE
from .timing import timed_phase
from .training_config import TrainingConfig

OUTPUT_FORMATS = ("table", "json")



def evaluate_split(sae: SAE, source: Any, config: TrainingConfig, *, split: str,
                   objective: Any = None, evaluators: Optional[EvaluationSuite] = None
                   ) -> MetricsRecord:
    """The metrics of ``sae`` -- as it is: pass the model you ship (calibrated) -- on ``source``
    (a held-out split: ``test`` for reported figures), computed by the job's evaluators
    (``evaluators``; None: those ``config.evaluators`` names on ``source``'s cache) -- a final
    evaluation, so every evaluator runs -- over at most ``config.eval_max_tokens`` tokens, with
    ``objective.evaluate`` as the objective's own pass (the default local objective when None;
    an ``EndToEndObjective`` adds the CE/KL figures). The record's ``eval_split`` names the
    split."""
    from .objective import LocalObjective

    objective = objective if objective is not None else LocalObjective(config)
    if evaluators is None:
        evaluators = EvaluationSuite.build(config, reader=getattr(source, "reader", None),
                                           hook=sae.cfg.hook_spec,
                                           target_hook=sae.cfg.hook_spec_out,
                                           objective=objective)
    was_training = sae.training
    sae.eval()
    try:
        with timed_phase(f"eval_{split}"):
            metrics, seconds = evaluators.evaluate(
                sae, source, split=split, max_tokens=config.eval_max_tokens, final=True,
                objective_pass=lambda: objective.evaluate(sae, source, config.eval_max_tokens))
    finally:
        sae.train(was_training)
    record = apply_figures(MetricsRecord(step=0, tokens_seen=0), metrics, seconds)
    record.threshold = sae.inference_threshold()
    record.eval_split = split
    return record


def evaluate_sae_dir(sae_dir: str | Path, *, cache: str, split: Optional[str] = None,
                     max_tokens: Optional[int] = None, output_format: str = "table",
                     stream: Optional[IO[str]] = None, show_progress: bool = True,
                     model: Any = None) -> MetricsRecord:
    """Evaluate the SAE saved in ``sae_dir`` on ``split`` of the cache ``cache`` (module doc).

    ``max_tokens``: stop after the windows covering this many train-mask tokens (None: all).
    Prints to ``stream`` (default stdout). ``model`` skips loading the cache's model (tests).
    """
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"output_format: must be one of {', '.join(OUTPUT_FORMATS)}, "
                          f"got {output_format!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens: must be >= 1, got {max_tokens}")
    from activation_cache import open_cache

    sae: SAE = load_sae_folder(sae_dir)
    reader = open_cache(cache)
    note = ""
    if split is None:  # the held-out test split; a cache built before test splits: val
        split = "test" if "test" in reader.manifest.get("splits", {}) else "val"
        if split == "val":
            note = " (the cache has no test split: these are validation figures)"
    hook = str(sae.cfg.hook_spec)
    source = SequenceSource(reader, split, hook, target_hook=sae.cfg.hook_spec_out,
                            shuffle=False)
    for name, mine, theirs, at in (("d_in", sae.cfg.d_in, source.d_in, hook),
                                   ("d_out", sae.cfg.d_out, source.d_out, source.target_hook)):
        if mine != theirs:
            raise ConfigError(f"{Path(sae_dir) / 'config.json'}: {name}={mine} but the cache "
                              f"stores {at} with width {theirs}")
    if getattr(reader, "has_ground_truth", False):
        # a synthetic cache: no model to splice into; the truth's recovery instead
        config = TrainingConfig(show_progress=show_progress, eval_max_tokens=max_tokens,
                                evaluators=("ground_truth",))
        tokens = reader.token_source(hook, split, target_hook=sae.cfg.hook_spec_out)
        record = evaluate_split(sae, tokens, config, split=split)
    else:
        model = model if model is not None else load_cache_model(reader)
        config = TrainingConfig(show_progress=show_progress, eval_max_tokens=max_tokens,
                                use_end_to_end=True)  # the CE/KL evaluator runs
        objective = EndToEndObjective(model, config)
        suite = EvaluationSuite.build(config, reader=reader, hook=hook,
                                      target_hook=sae.cfg.hook_spec_out, objective=objective)
        record = evaluate_split(sae, source, config, split=split, objective=objective,
                                evaluators=suite)
    out = stream if stream is not None else sys.stdout
    out.write(format_metrics(record, output_format,
                             header=f"{sae_dir} on {cache} [{split}]{note}"))
    out.flush()
    return record


def metric_descriptions() -> dict[str, str]:
    """What ``sae-sweep eval`` shows: every evaluator's fields and the shipped threshold, with
    their descriptions."""
    out = {name: f.description for name, f in declared_fields().items()}
    out["threshold"] = "inference threshold (mean over latents)"
    return out


def format_metrics(record: MetricsRecord, output_format: str, *, header: str = "") -> str:
    """The evaluation metrics of ``record`` as an aligned table or a JSON object (an
    evaluator's fields the record lacks are left out; the rest shown ``-`` when None)."""
    descriptions = metric_descriptions()
    values = {name: record.get(name) for name in descriptions
              if hasattr(record, name) or name in record.extra}
    if output_format == "json":
        return json.dumps(values, indent=2) + "\n"
    lines = [header] if header else []
    width = max(len(n) for n in values)
    for name, value in values.items():
        if value is None:
            shown = "-"
        elif isinstance(value, float):
            shown = f"{value:.6g}"
        else:
            shown = str(value)
        lines.append(f"{name:<{width}}  {shown:>12}  {descriptions[name]}")
    return "\n".join(lines) + "\n"
