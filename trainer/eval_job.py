"""``sae-sweep eval``: every metric of a saved SAE on a cache split, spliced into its model.

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

from .end_to_end import EndToEndObjective, SequenceSource, load_cache_model
from .metrics import MetricsRecord
from .saelens_export import load_sae_folder
from .saes.base import SAE
from .timing import timed_phase
from .training_config import TrainingConfig

OUTPUT_FORMATS = ("table", "json")

_DESCRIPTIONS = {
    "eval_tokens": "train-mask tokens evaluated",
    "mse": "reconstruction MSE (raw units, shipped encoder)",
    "fvu": "fraction of variance unexplained",
    "explained_variance": "1 - FVU",
    "l0": "active latents per token (shipped encoder)",
    "l0_train": "active latents per token (training encoding)",
    "fvu_train": "FVU of the training encoding (batch-level)",
    "dead_fraction": "latents that never fired here",
    "dense_fraction": "latents firing on > 10% of tokens",
    "density_histogram": "live latents per decade of firing frequency",
    "threshold": "inference threshold (mean over latents)",
    "ce_loss_clean": "next-token CE of the clean model (nats)",
    "ce_loss_spliced": "... with the SAE spliced in",
    "ce_loss_zero_ablation": "... with the hook zeroed on the same tokens",
    "ce_loss_delta": "spliced - clean",
    "ce_loss_score": "(zero - spliced) / (zero - clean); 1 = lossless",
    "kl_div": "KL(clean || spliced), nats per token",
    "top1_agreement": "argmax spliced == argmax clean",
    "block_mse": "downstream block MSE (scaled units)",
}


def evaluate_split(sae: SAE, source: Any, config: TrainingConfig, *, split: str,
                   objective: Any = None) -> MetricsRecord:
    """The metrics of ``sae`` -- as it is: pass the model you ship (calibrated) -- on ``source``
    (a held-out split: ``test`` for reported figures), computed by ``objective.evaluate`` (the
    default local objective when None; an ``EndToEndObjective`` adds the CE/KL figures) over at
    most ``config.eval_max_tokens`` tokens. The record's ``eval_split`` names the split."""
    from .objective import LocalObjective

    objective = objective if objective is not None else LocalObjective(config)
    was_training = sae.training
    sae.eval()
    try:
        with timed_phase(f"eval_{split}"):
            metrics = objective.evaluate(sae, source, config.eval_max_tokens)
    finally:
        sae.train(was_training)
    record = MetricsRecord(step=0, tokens_seen=0)
    for key, value in metrics.items():
        setattr(record, key, value)
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
    model = model if model is not None else load_cache_model(reader)
    config = TrainingConfig(show_progress=show_progress, eval_max_tokens=max_tokens)
    record = evaluate_split(sae, source, config, split=split,
                            objective=EndToEndObjective(model, config))
    out = stream if stream is not None else sys.stdout
    out.write(format_metrics(record, output_format,
                             header=f"{sae_dir} on {cache} [{split}]{note}"))
    out.flush()
    return record


def format_metrics(record: MetricsRecord, output_format: str, *, header: str = "") -> str:
    """The evaluation metrics of ``record`` as an aligned table or a JSON object."""
    values = {name: getattr(record, name) for name in _DESCRIPTIONS}
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
        lines.append(f"{name:<{width}}  {shown:>12}  {_DESCRIPTIONS[name]}")
    return "\n".join(lines) + "\n"
