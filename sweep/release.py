"""`sae-sweep export EXP --release OUT`: a suite as one release folder.

``OUT/`` holds

* one SAELens folder per hook (``OUT/<hook>/``, e.g. ``OUT/blocks.6.hook_resid_post/``): the
  hook's winner (:func:`sweep.suite_results.hook_winners`: the sweep's objective and
  constraints), written by ``trainer.export_sae`` -- the one export path, with the same
  metadata and card as ``sae-sweep export``;
* ``release.yaml``: an index shaped like an entry of SAELens's ``pretrained_saes.yaml`` (the
  release name mapping to ``repo_id``, ``model``, ``conversion_func``, ``links`` and ``saes``:
  one ``{id, path, l0, ...}`` per SAE), plus per SAE its architecture, width, trial and
  headline figures (val and test), and the model and data facts of the cache;
* ``README.md``: the release card -- the per-hook table and the plot;
* ``winners_by_layer.png``: the winners' figures against the layer (when hooks have layers).

The whole folder is written atomically (``trainer.atomic_directory``, kind ``release``): ``OUT``
must be absent, empty or an earlier release; anything else is refused before any work and left
as it is. A hook without a winner is skipped, and the closing line says so.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .export import _plain  # the one conversion of a results cell to a YAML value

import yaml

from activation_cache import UserError

from .suite_results import WINNER_METRICS, hook_winners, layer_plot, per_hook_lines

logger = logging.getLogger("sweep.export")

INDEX_FILE = "release.yaml"
PLOT_FILE = "winners_by_layer.png"


class ReleaseError(UserError, ValueError):
    """No hook of the sweep has a trial to release."""


def export_release(experiment_dir: str | Path, *, out_dir: str | Path,
                   name: str | None = None) -> Path:
    """Write the release of the sweep in ``experiment_dir`` to ``out_dir``; return it."""
    from trainer import atomic_directory, cache_facts, check_output_folder, export_sae, load_sae

    from .export import model_card
    from .results import load_results, load_sweep_info

    out = Path(out_dir)
    check_output_folder(out, "release", flag="--release")  # before any work
    frame = load_results(experiment_dir)
    info = load_sweep_info(experiment_dir)
    winners = hook_winners(frame, info)
    chosen = winners[winners["trial_id"].notna()]
    chosen = chosen[chosen["checkpoint_path"].notna()] if "checkpoint_path" in chosen else chosen
    if chosen.empty:
        raise ReleaseError(f"{experiment_dir}: no hook has a completed trial meeting the sweep's "
                           "constraints yet; see `sae-sweep best --per-hook`")
    skipped = [h for h in winners["hook"] if h not in set(chosen["hook"])]
    config = info.get("config", {})
    facts = cache_facts(config.get("cache"))
    name = name or out.name
    entries = []
    with atomic_directory(out, kind="release", flag="--release",
                          description=f"sae-sweep release of {len(chosen)} SAE(s)") as tmp:
        for _, row in chosen.iterrows():
            row = {k: _plain(v) for k, v in row.items()}
            sae = load_sae(row["checkpoint_path"])
            export_sae(sae, tmp / row["hook"], output_format="saelens", facts=facts,
                       card=model_card(row, sae.cfg, info, "saelens", facts))
            entries.append(_entry(row, sae.cfg))
        identity = facts.get("identity") or {}
        spec = facts.get("model_spec") or {}
        index = {name: {
            "repo_id": None, "model": identity.get("name"),
            "conversion_func": None,
            "links": {"model": spec.get("name") or spec.get("path")},
            "saes": entries,
            "sae_sweep": {"experiment": str(experiment_dir), "objective": config.get("objective"),
                          "num_samples_per_hook": config.get("num_samples"),
                          "tokens_per_trial": config.get("tokens_per_trial"),
                          "model": _jsonable({k: v for k, v in identity.items()
                                              if k != "hook_names"}),
                          "data": _jsonable({k: facts.get(k) for k in (
                              "uri", "corpus", "splits", "context_size", "prepend_bos",
                              "exclude_bos", "act_dtype")}),
                          "skipped_hooks": skipped},
        }}
        (tmp / INDEX_FILE).write_text(yaml.safe_dump(index, sort_keys=False))
        plot = layer_plot(chosen, tmp / PLOT_FILE, title=f"{name}: winner per layer")
        (tmp / "README.md").write_text(_card(name, chosen, info, facts, plot is not None))
    logger.info("wrote release %s: %d SAE folder(s) (%s), %s, README.md%s%s", out, len(entries),
                ", ".join(e["id"] for e in entries), INDEX_FILE,
                f", {PLOT_FILE}" if (out / PLOT_FILE).exists() else "",
                f"; no winner for {', '.join(skipped)}" if skipped else "")
    return out


def _entry(row: dict[str, Any], sae_cfg: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": row["hook"], "path": row["hook"], "l0": _num(row.get("l0"))}
    entry.update(architecture=sae_cfg.architecture, d_in=int(sae_cfg.d_in),
                 d_sae=int(sae_cfg.d_sae), trial_id=row["trial_id"])
    entry["figures"] = {split: {m: _num(row.get(prefix + m)) for m in WINNER_METRICS
                                if _num(row.get(prefix + m)) is not None}
                        for split, prefix in (("val", ""), ("test", "test_"))}
    return entry


def _card(name: str, winners: Any, info: dict[str, Any], facts: dict[str, Any],
          has_plot: bool) -> str:
    config = info.get("config", {})
    lines = [f"# {name}", "",
             f"One sparse autoencoder per hook of "
             f"{(facts.get('identity') or {}).get('name') or 'the model'}, "
             f"each the winner of its own search in the sae-sweep suite "
             f"`{config.get('experiment_dir', '?')}` ({config.get('num_samples', '?')} trials "
             f"per hook, {config.get('tokens_per_trial', '?')} training tokens each).", "",
             "Selection used the validation split; the test figures are held out.", "",
             "```", *per_hook_lines(winners, info), "```", ""]
    if has_plot:
        lines += [f"![winners by layer]({PLOT_FILE})", ""]
    lines += ["Each folder loads with `sae_lens.SAE.load_from_disk(FOLDER)`; its README.md is "
              "the SAE's own card. The index is `release.yaml`.", ""]
    return "\n".join(lines)




def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _jsonable(data: Any) -> Any:
    if isinstance(data, dict):
        return {str(k): _jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_jsonable(v) for v in data]
    return data if data is None or isinstance(data, (str, int, float, bool)) else str(data)
