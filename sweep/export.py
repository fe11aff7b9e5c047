"""`sae-sweep export`: write one trial's SAE (native or SAELens format) with a README card.

The SAE comes from the trial's last checkpoint in Tune's storage (the checkpoint layout is the
trainer's, so ``trainer.load_sae`` opens it). ``trial="best"`` picks the sweep's best trial by
its objective (constraints applied; the first metric for a Pareto objective); when the sweep has
replicates (its confirm stage), the configuration with the best mean over seeds, and of its
runs the one best on validation (:func:`sweep.replicates.export_choice`; the log line and the
card say which trial and seed, and why).

The folder is written by ``trainer.export_sae``, the export path ``sae-sweep train``'s
``saelens/`` takes too: the same SAELens ``cfg.json`` metadata (``model_name``, ``hook_name``,
``context_size``, ``prepend_bos``, ``dataset_path``, the cache's model fingerprint, when the
cache is readable) and the same card (``trainer.model_card``), here with the trial's searched
hyperparameters and its validation and test figures. ``--out`` must be a new or empty folder or
an earlier export: a folder holding anything else is refused and left as it is.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from activation_cache import UserError

from .best import select_best
from .replicates import export_choice
from .results import load_results, load_sweep_info

logger = logging.getLogger("sweep.export")

OUTPUT_FORMATS = ("saelens", "native")


class ExportError(UserError, ValueError):
    """The requested trial does not exist, has no checkpoint, or the format is unknown."""


def export_trial(experiment_dir: str | Path, *, trial: str = "best", out_dir: str | Path,
                 output_format: str = "saelens") -> Path:
    """Export ``trial`` (an id or ``"best"``) of the sweep to ``out_dir``; return ``out_dir``."""
    from trainer import cache_facts, check_output_folder, export_sae, figures_text, load_sae

    if output_format not in OUTPUT_FORMATS:
        raise ExportError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, "
                          f"got {output_format!r}")
    out = Path(out_dir)
    check_output_folder(out, "export", flag="--out")  # before any work: refused, nothing touched
    frame = load_results(experiment_dir)
    info = load_sweep_info(experiment_dir)
    row = _pick(frame, trial, info)
    chosen = row.pop("_choice", None)  # why this run, when the sweep has replicates
    if chosen:
        logger.info("export --trial best: %s", chosen)
    checkpoint = row.get("checkpoint_path")
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ExportError(f"trial {row['trial_id']} has no checkpoint to export "
                          f"(status {row['status']})")
    sae = load_sae(checkpoint)
    facts = cache_facts(info.get("config", {}).get("cache"))
    export_sae(sae, out, output_format=output_format, facts=facts,
               card=model_card(row, sae.cfg, info, output_format, facts, chosen=chosen),
               flag="--out")
    figures = figures_text(split_figures(row)) or "no figures recorded"
    logger.info("exported trial %s in %s format to %s: %s\n  shipped encoder: %s",
                row["trial_id"], "SAELens" if output_format == "saelens" else "sae-sweep's native",
                out, ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))),
                figures)
    return out


def split_figures(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A results row's figures by split: the validation columns and the ``test_*`` ones."""
    from trainer import CARD_METRICS

    return {"val": {k: row.get(k) for k in CARD_METRICS},
            "test": {k: row.get(f"test_{k}") for k in CARD_METRICS}}


def model_card(row: dict[str, Any], sae_cfg: Any, info: dict[str, Any], output_format: str,
               facts: dict[str, Any] | None = None, chosen: str | None = None) -> str:
    """The README.md of a trial's export (``trainer.model_card`` with the trial's facts;
    ``chosen``: why ``--trial best`` took this run of a sweep with replicates)."""
    from trainer import render_model_card

    cfg = info.get("config", {})
    objective = cfg.get("objective", {})
    budget = cfg.get("tokens_per_trial")
    return render_model_card(
        sae_cfg, facts=facts, output_format=output_format,
        origin=(f"Trial `{row['trial_id']}` of the sae-sweep sweep in "
                f"`{cfg.get('experiment_dir', '?')}` (objective: {objective.get('mode', '?')} "
                f"{objective.get('metric', '?')}, on the validation split)."
                + (f" Chosen over seeds: {chosen}." if chosen else "")),
        budget=(f"token budget: {budget:,} training tokens per trial; this SAE trained on "
                f"{_count(row.get('tokens_seen'))} tokens in {_fmt(row.get('train_seconds'))} s"
                if isinstance(budget, int) else
                f"training tokens: {row.get('tokens_seen')}, training time: "
                f"{_fmt(row.get('train_seconds'))} s"),
        parameters_title="Hyperparameters (searched)",
        parameters={k: row[k] for k in _param_names(row, cfg) if row.get(k) is not None},
        figures=split_figures(row))


def _pick(frame: pd.DataFrame, trial: str, info: dict[str, Any]) -> dict[str, Any]:
    choice = None
    if trial == "best":
        objective = info.get("config", {}).get("objective", {})
        choice = best_export_choice(frame, info)
        if choice is not None:  # a sweep with replicates: the configuration with the best mean
            if choice.trial_id is None:
                raise ExportError(f"{choice.reason}; see `sae-sweep best` for what is there, "
                                  "and export one by id with --trial TRIAL_ID")
            trial = choice.trial_id
    if trial == "best":
        best = select_best(frame, objective=objective, top=1)
        if best.empty:
            constraints = objective.get("constraints") or []
            why = (" meets the sweep's constraints" if constraints else
                   " has a finite objective value")
            raise ExportError(f"no completed trial{why} yet; see `sae-sweep best` for what is "
                              "there, and export one by id with --trial TRIAL_ID")
        trial = str(best.iloc[0]["trial_id"])
    match = frame[frame["trial_id"] == trial]
    if match.empty:
        raise ExportError(f"no trial {trial!r}; trials are: {', '.join(frame['trial_id'])}")
    row = {k: _plain(v) for k, v in match.iloc[0].to_dict().items()}
    if choice is not None:
        row["_choice"] = choice.reason
    return row


def best_export_choice(frame: pd.DataFrame, info: dict[str, Any]) -> Any:
    """What ``--trial best`` ships when the sweep has replicates (a
    :class:`~sweep.replicates.ExportChoice`: the configuration with the best mean, its best
    seed on validation, and why); None without replicates."""
    from .best import configuration_columns
    from .sweep_config import ConstraintSpec

    cfg = info.get("config", {})
    objective = cfg.get("objective", {})
    metrics = objective.get("metric") or "fvu"
    modes = objective.get("mode") or "min"
    metric = metrics if isinstance(metrics, str) else metrics[0]
    mode = modes if isinstance(modes, str) else modes[0]
    return export_choice(frame, metric=metric, mode=mode,
                         constraints=[ConstraintSpec.from_dict(c)
                                      for c in objective.get("constraints") or []],
                         params=configuration_columns(frame, list(cfg.get("search_space") or [])))


def _param_names(row: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    names = list(cfg.get("search_space", {}))
    if "expansion_factor" in names:
        names.append("d_sae")
    return [n for n in names if n in row]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _count(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) and math.isfinite(value) else "?"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
