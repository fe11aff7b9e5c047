"""`sae-sweep export`: write one trial's SAE (native or SAELens format) with a README card.

The SAE comes from the trial's last checkpoint in Tune's storage (the checkpoint layout is the
trainer's, so ``trainer.load_sae`` opens it). ``trial="best"`` picks the sweep's best trial by
its objective (constraints applied; the first metric for a Pareto objective).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from activation_cache import UserError

from .best import select_best
from .results import load_results, load_sweep_info

OUTPUT_FORMATS = ("saelens", "native")
_CARD_METRICS = ("fvu", "explained_variance", "l0", "l0_train", "fvu_train", "mse",
                 "dead_fraction", "dense_fraction", "kl_div", "ce_loss_delta", "ce_loss_score",
                 "top1_agreement")


class ExportError(UserError, ValueError):
    """The requested trial does not exist, has no checkpoint, or the format is unknown."""


def export_trial(experiment_dir: str | Path, *, trial: str = "best", out_dir: str | Path,
                 output_format: str = "saelens") -> Path:
    """Export ``trial`` (an id or ``"best"``) of the sweep to ``out_dir``; return ``out_dir``."""
    from trainer import export_saelens, load_sae

    if output_format not in OUTPUT_FORMATS:
        raise ExportError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, "
                          f"got {output_format!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file, not a folder")
    frame = load_results(experiment_dir)
    info = load_sweep_info(experiment_dir)
    row = _pick(frame, trial, info)
    checkpoint = row.get("checkpoint_path")
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ExportError(f"trial {row['trial_id']} has no checkpoint to export "
                          f"(status {row['status']})")
    sae = load_sae(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    if output_format == "saelens":
        export_saelens(sae, str(out))
    else:
        sae.save(str(out))
    (out / "README.md").write_text(model_card(row, sae.cfg, info, output_format))
    return out


def _pick(frame: pd.DataFrame, trial: str, info: dict[str, Any]) -> dict[str, Any]:
    if trial == "best":
        objective = info.get("config", {}).get("objective", {})
        best = select_best(frame, objective=objective, top=1)
        if best.empty:
            raise ExportError("no finished trial with a finite objective value to export yet")
        trial = str(best.iloc[0]["trial_id"])
    match = frame[frame["trial_id"] == trial]
    if match.empty:
        raise ExportError(f"no trial {trial!r}; trials are: {', '.join(frame['trial_id'])}")
    return {k: _plain(v) for k, v in match.iloc[0].to_dict().items()}


def model_card(row: dict[str, Any], sae_cfg: Any, info: dict[str, Any], output_format: str) -> str:
    """The README.md written next to the exported SAE."""
    cfg = info.get("config", {})
    params = {k: row[k] for k in _param_names(row, cfg) if row.get(k) is not None}
    metrics = {k: row[k] for k in _CARD_METRICS if row.get(k) is not None}
    objective = cfg.get("objective", {})
    hook = getattr(sae_cfg, "hook_spec", cfg.get("hook"))
    lines = [
        f"# Sparse autoencoder for `{hook}`",
        "",
        f"Trial `{row['trial_id']}` of the sae-sweep sweep in `{info.get('config', {}).get('experiment_dir', '?')}`"
        f" (objective: {objective.get('mode', '?')} {objective.get('metric', '?')}).",
        "",
        "## Model and data",
        "",
        f"- activation cache: `{cfg.get('cache', '?')}`",
        f"- hook: `{hook}` (d_in = {getattr(sae_cfg, 'd_in', '?')})",
        f"- architecture: {getattr(sae_cfg, 'architecture', '?')}, d_sae = "
        f"{getattr(sae_cfg, 'd_sae', '?')}, top_k = {getattr(sae_cfg, 'top_k', None)}",
        f"- training tokens: {row.get('tokens_seen')}, training time: "
        f"{_fmt(row.get('train_seconds'))} s",
        "",
        "## Hyperparameters (searched)",
        "",
        "| name | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in params.items()],
        "",
        "## Metrics (validation split, final evaluation)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in metrics.items()],
        "",
        "`l0` is the inference L0 (BatchTopK with its learned threshold, one token at a time); "
        "`fvu` = 1 - explained variance.",
        "",
        "## Full SAE config",
        "",
        "```json",
        json.dumps(sae_cfg.to_dict() if hasattr(sae_cfg, "to_dict") else {}, indent=2),
        "```",
        "",
        "## How to load it",
        "",
    ]
    if output_format == "saelens":
        lines += [
            "With SAELens (this folder holds `cfg.json` and `sae_weights.safetensors`):",
            "",
            "```python",
            "from sae_lens import SAE",
            "sae = SAE.load_from_disk(\"PATH/TO/THIS/FOLDER\", device=\"cpu\")",
            "features = sae.encode(activations)      # activations: [..., d_in], raw",
            "reconstruction = sae.decode(features)",
            "```",
            "",
            "With sae-sweep, export the native format (`sae-sweep export ... --format native`) "
            "and use `trainer.load_sae(folder)`.",
        ]
    else:
        lines += [
            "With sae-sweep (this folder holds `config.json` and `weights.safetensors`):",
            "",
            "```python",
            "from trainer import load_sae",
            "sae = load_sae(\"PATH/TO/THIS/FOLDER\")",
            "x_hat, features = sae(activations)      # activations: [..., d_in], raw",
            "```",
            "",
            "For SAELens, export with `--format saelens` and use "
            "`sae_lens.SAE.load_from_disk(folder)`.",
        ]
    return "\n".join(lines) + "\n"


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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
