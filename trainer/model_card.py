"""The README.md model card written next to every exported SAE, and the cache facts it states.

One card for every export path (``sae-sweep export`` of a sweep trial, ``sae-sweep train``'s
``saelens/``): it names the model (as the cache config gave it, and its identity from the cache
manifest: name, weights sha256, shape), the corpus and its train / val / test split with the
role of each, the context length, the BOS policy, the hook and architecture, the training
budget, the hyperparameters, and the shipped encoder's held-out figures, each column labelled
with its split. :func:`cache_facts` reads what the card and the SAELens metadata
(``saelens_export.saelens_metadata``) say about the model and data from the cache's manifest.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Mapping, Optional, Sequence

from .registry import describe_sae
from .evaluators import declared_fields, extra_metric_names

logger = logging.getLogger("trainer.model_card")

BASE_CARD_METRICS = ("fvu", "explained_variance", "l0", "l0_train", "fvu_train", "mse",
                     "dead_fraction", "dense_fraction", "kl_div", "ce_loss_delta",
                     "ce_loss_score", "top1_agreement")
CARD_METRICS = BASE_CARD_METRICS + tuple(n for n in extra_metric_names()
                                         if n not in BASE_CARD_METRICS)
"""The figures a card shows (those the record has), in this order: reconstruction and
end-to-end ones, then every other evaluator's numeric fields (trainer/evaluators/)."""

SPLIT_ROLES = {
    "train": "training (and the calibration of an inference threshold, where the architecture "
             "has one)",
    "val": "selection: validation records, the best checkpoint, a sweep's objective and early "
           "stopping",
    "test": "the reported figures; nothing was tuned on it",
}
_LABELS = {"dead_fraction": "dead", "explained_variance": "ev"}
_COLUMN = {"train": "train (training-batch averages)", "val": "val (selection)",
           "test": "test (reported)"}


def cache_facts(cache: Any, manifest: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What the card and the SAELens metadata say about the model and data: from ``manifest``
    (the cache's, when the caller has it open), else read from the cache ``cache``. ``{}`` when
    the cache is not readable any more (moved or deleted since)."""
    if manifest is None:
        if not cache:
            return {}
        try:
            from activation_cache import open_cache

            manifest = open_cache(str(cache), verify=False).manifest
        except Exception as exc:  # moved or deleted since the sweep: the card says so
            logger.debug("cannot read the cache %s for the model card: %s", cache, exc)
            return {}
    cfg = manifest.get("config") or {}
    synthetic = manifest.get("synthetic")
    return {"synthetic": synthetic["spec"] if synthetic else None, "uri": str(cache) if cache else None, "model_spec": cfg.get("model") or {},
            "identity": manifest.get("model") or {}, "corpus": cfg.get("corpus") or {},
            "splits": manifest.get("splits") or {},
            "context_size": cfg.get("max_text_length"), "prepend_bos": cfg.get("prepend_bos"),
            "exclude_bos": cfg.get("exclude_bos"), "val_fraction": cfg.get("val_fraction"),
            "test_fraction": cfg.get("test_fraction"), "split_seed": cfg.get("seed"),
            "act_dtype": manifest.get("act_dtype")}


def render_model_card(sae_cfg: Any, *, facts: Optional[Mapping[str, Any]], output_format: str,
               origin: str, budget: str, parameters_title: str,
               parameters: Mapping[str, Any], figures: Mapping[str, Mapping[str, Any]]) -> str:
    """The README.md of an exported SAE.

    ``origin``: one sentence on what produced it (a sweep trial, a training job); ``budget``:
    one line on the tokens and time it trained for; ``parameters``: the hyperparameters worth
    stating (``parameters_title`` names them: searched, or the job's settings); ``figures``:
    ``{split: {metric: value}}`` of the shipped encoder (splits in the order given)."""
    facts = facts or {}
    hook = getattr(sae_cfg, "hook_spec", None)
    model = (facts.get("identity") or {}).get("name")
    splits = [s for s, values in figures.items() if any(_shown(values.get(k))
                                                         for k in CARD_METRICS)]
    names = [k for k in CARD_METRICS if any(_shown(figures[s].get(k)) for s in splits)]
    lines = [
        f"# Sparse autoencoder for `{hook}`" + (f" of {model}" if model else ""),
        "",
        origin,
        "",
        "## Model and data",
        "",
        *_model_lines(facts),
        *_hook_lines(sae_cfg),
        *_architecture_lines(sae_cfg),
        f"- {budget}",
        "",
        f"## {parameters_title}",
        "",
        "| name | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in parameters.items() if v is not None],
        "",
        "## Held-out metrics of the shipped encoder (final evaluation)",
        "",
        "Each column is one split of the cache: "
        + "; ".join(f"`{s}`: {SPLIT_ROLES.get(s, s)}" for s in splits) + "."
        if splits else "No held-out figures were recorded.",
        "",
    ]
    if splits:
        lines += ["| metric | " + " | ".join(_COLUMN.get(s, s) for s in splits) + " |",
                  "|---|" + "---|" * len(splits),
                  *[f"| {k} | " + " | ".join(_fmt(figures[s].get(k)) for s in splits) + " |"
                    for k in names], ""]
    lines += [
        *_metric_notes(sae_cfg, names),
        "",
        "## Full SAE config",
        "",
        "```json",
        json.dumps(sae_cfg.to_dict() if hasattr(sae_cfg, "to_dict") else {}, indent=2),
        "```",
        "",
        "## How to load it",
        "",
        *_loading_lines(output_format),
    ]
    return "\n".join(lines) + "\n"


def figures_text(figures: Mapping[str, Mapping[str, Any]],
                 names: tuple[str, ...] = ("fvu", "l0")) -> str:
    """``val fvu 0.5255, l0 45.0; test fvu 0.5301, l0 44.9``: the shipped encoder's figures,
    each group labelled with its split (what closing lines print)."""
    parts = []
    for split, values in figures.items():
        shown = [f"{_LABELS.get(n, n)} {_short(values.get(n), n)}" for n in names
                 if _shown(values.get(n))]
        if shown:
            parts.append(f"{split} " + ", ".join(shown))
    return "; ".join(parts)


# -- the sections -------------------------------------------------------------------------------


def _hook_lines(sae_cfg: Any) -> list[str]:
    """The hook it reads and, for a transcoder, the hook it writes."""
    hook, d_in = getattr(sae_cfg, "hook_spec", None), getattr(sae_cfg, "d_in", "?")
    out = getattr(sae_cfg, "hook_spec_out", None)
    if out is None or out == hook:
        return [f"- hook: `{hook}` (d_in = {d_in})"]
    return [f"- reads `{hook}` (d_in = {d_in}) and reconstructs `{out}` "
            f"(d_out = {getattr(sae_cfg, 'd_out', '?')})"]


def _architecture_lines(sae_cfg: Any) -> list[str]:
    """What the card says about the architecture: the architecture's own description (its
    fields; ``registry.describe_sae``), never another architecture's words."""
    if not hasattr(sae_cfg, "architecture") or not hasattr(sae_cfg, "options"):
        return [f"- architecture: {getattr(sae_cfg, 'architecture', '?')}"]
    return [f"- architecture: {describe_sae(sae_cfg).summary()}"]


def _metric_notes(sae_cfg: Any, names: Sequence[str] = ()) -> list[str]:
    rule = (describe_sae(sae_cfg).inference if hasattr(sae_cfg, "options")
            else "the shipped encoder")
    fields = declared_fields()
    notes = [f"`{n}`: {fields[n].description}." for n in names
             if n in fields and n not in BASE_CARD_METRICS]
    return [f"`l0` is the inference L0 of the shipped encoder ({rule}); "
            "`fvu` = 1 - explained variance." + "".join(f" {t}" for t in notes)]


def _model_lines(facts: Mapping[str, Any]) -> list[str]:
    if not facts or not facts.get("identity"):
        return ["- model and data: the cache is not readable any more; see its manifest.json"]
    if facts.get("synthetic"):
        spec = facts["synthetic"]
        return [
            f"- data: **synthetic** activations (no model): {spec.get('n_features')} known "
            f"sparse features in {spec.get('d')} dimensions, ~{spec.get('mean_active')} active "
            f"per token (power-law exponent {spec.get('frequency_exponent')}, noise "
            f"{spec.get('noise_std')}, seed {spec.get('seed')}); the truth is stored with the "
            "cache (`feature_mcc` measures its recovery)",
            f"- windows of {facts.get('context_size')} tokens; val_fraction "
            f"{facts.get('val_fraction')}, test_fraction {facts.get('test_fraction')} of them",
            f"- activation cache: `{facts.get('uri')}` (stored as {facts.get('act_dtype')})",
        ]
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
            return f"  - {name}: none"
        docs = info.get("num_documents", "?")
        return (f"  - {name}: {info.get('num_tokens', 0):,} tokens, "
                f"{info.get('num_sequences', 0):,} windows, {docs} "
                f"document{'' if docs == 1 else 's'} -- {SPLIT_ROLES[name]}")

    bos = ("each window starts with BOS" if facts.get("prepend_bos") else "no BOS prepended")
    bos += ("; BOS is left out of the tokens the SAE trained and was evaluated on"
            if facts.get("prepend_bos") and facts.get("exclude_bos") else "")
    return [
        f"- model: **{ident.get('name', '?')}** (as given: {given or '?'})",
        f"- model identity: {shape}; weights sha256 `{sha}`; fingerprint "
        f"`{ident.get('fingerprint')}`" if sha else f"- model identity: {shape}",
        f"- corpus: {corpus_text}",
        f"- split by document (val_fraction {facts.get('val_fraction')}, test_fraction "
        f"{facts.get('test_fraction')}, seed {facts.get('split_seed')}):",
        *[split(name) for name in ("train", "val", "test")],
        f"- context length: windows of {facts.get('context_size')} tokens; {bos}",
        f"- activation cache: `{facts.get('uri')}` (stored as {facts.get('act_dtype')})",
    ]


def _loading_lines(output_format: str) -> list[str]:
    if output_format == "saelens":
        return [
            "With SAELens (this folder holds `cfg.json` and `sae_weights.safetensors`):",
            "",
            "```python",
            "from sae_lens import SAE",
            "sae = SAE.load_from_disk(\"PATH/TO/THIS/FOLDER\", device=\"cpu\")",
            "features = sae.encode(activations)      # activations: [..., d_in], raw",
            "reconstruction = sae.decode(features)",
            "```",
            "",
            "With sae-sweep, `sae-sweep eval PATH/TO/THIS/FOLDER --cache CACHE` reads it as it "
            "is; `trainer.load_sae_folder(folder)` loads it into sae-sweep's SAE class.",
        ]
    return [
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


# -- formatting ---------------------------------------------------------------------------------


def _shown(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _short(value: Any, name: str) -> str:
    if name.startswith("l0"):
        return f"{value:.1f}"
    return f"{value:.4g}"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
