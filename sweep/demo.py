"""`sae-sweep demo`: the main job on the embedded default, end to end on local Ray.

1. Build (or reuse) a small activation cache: SmolLM2-135M-Instruct (the embedded model) on the
   built-in Shakespeare corpus, layer-6 residual stream, with the compact clean logits and the
   splice residual that end-to-end losses need, through activation_cache's public API.
2. Run a small Optuna sweep on local Ray (``sweep/demo_sweep.yaml``) over the width, the
   sparsity and AuxK weights and the KL weight. Each trial trains locally on the cached activations, then fine-tunes end to end (KL through
   the rest of the model) over its last 5 % of tokens (the two-phase schedule of
   trainer/finetune.py); the objective is the CE-loss increase when the SAE is spliced in,
   subject to L0 <= 64, on held-out validation windows. Then its confirm stage re-trains the
   best configuration with 2 new seeds (``confirm`` in the YAML; :mod:`sweep.confirm`). Sized to
   finish in about 10 minutes on 2 CPU cores including the cache build.
3. Print the best configurations (``mean ± sd`` over seeds), export the winner in SAELens
   format with its model card (which seed, and why), and write the report plots.

Re-running with the same ``out_dir`` reuses the cache and resumes (or simply re-reads) the
sweep instead of starting over.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import pandas as pd
import yaml

from activation_cache import CacheConfig, ProbesSpec, UserError

from .best import print_best
from .driver import configure_logging, resume_sweep, run_sweep
from .export import export_trial
from .report import write_report
from .results import load_sweep_info
from .sweep_config import SweepConfig

logger = logging.getLogger("sweep.demo")

DEMO_SWEEP = Path(__file__).with_name("demo_sweep.yaml")
"""The demo's sweep (model, hook, architecture, search space, objective) as a YAML file."""
DEMO_CACHE_TOKENS = 48_000
"""Real tokens cached (train + val + test), with the compact logits the fine-tune needs (a full
forward of SmolLM2 per token: about 4 minutes on 2 cores)."""
DEMO_HELD_OUT_FRACTION = 0.15
"""val_fraction and test_fraction of the demo's cache: 6 of Shakespeare's 42 texts each (the
default 0.1 gives 4, under the 5 documents below which a split's statistics get a warning)."""
DEMO_PROBE_TEXTS = 200
"""Texts per probe set in the demo's cache (sae-probes' default subset of 8 binary sets; each
split into probe train/val/test parts): what its ``probe_accuracy_*`` columns are measured on."""
DEMO_NUM_SAMPLES = 4
"""Search trials; the confirm stage adds 2 replicates of the best."""
DEMO_MAX_CONCURRENT = 2


def demo_sweep_config(out_dir: Path, *, num_samples: int, max_concurrent: int) -> SweepConfig:
    """The demo's sweep (``demo_sweep.yaml``) on the cache under ``out_dir``."""
    data = yaml.safe_load(DEMO_SWEEP.read_text())
    data.update({"cache": str(out_dir / "cache"), "experiment_dir": str(out_dir / "sweep"),
                 "num_samples": num_samples, "max_concurrent_trials": max_concurrent,
                 "n_startup_trials": max(2, num_samples // 2)})
    return SweepConfig.from_dict(data)


def demo_cache_config(out_dir: Path, **overrides) -> CacheConfig:
    """The demo's cache: SmolLM2 layer 6 on Shakespeare with the compact logits, capped at
    DEMO_CACHE_TOKENS (windows sampled across the plays of every split), and the last-token
    activations of sae-probes' default probe sets (DEMO_PROBE_TEXTS texts each) for the
    probing evaluator; ``overrides`` replace
    fields (the tests swap in the tiny model)."""
    hook = yaml.safe_load(DEMO_SWEEP.read_text())["hook"]
    fields = {"output": str(out_dir / "cache"), "hooks": (hook,),
              "max_tokens": DEMO_CACHE_TOKENS, "store_logits": True,
              "val_fraction": DEMO_HELD_OUT_FRACTION, "test_fraction": DEMO_HELD_OUT_FRACTION,
              "probes": ProbesSpec(texts_per_set=DEMO_PROBE_TEXTS)}
    fields.update(overrides)
    return CacheConfig(**fields)


def run_demo(out_dir: str | Path = "runs/demo", num_samples: Optional[int] = None,
             max_concurrent: Optional[int] = None) -> pd.DataFrame:
    """Run the demo into ``out_dir``; return the best trials."""
    from activation_cache import build_cache

    configure_logging("activation_cache")  # the cache build's notes and summary too
    out = Path(out_dir).expanduser().resolve()
    num_samples = DEMO_NUM_SAMPLES if num_samples is None else num_samples
    max_concurrent = DEMO_MAX_CONCURRENT if max_concurrent is None else max_concurrent
    if num_samples < 1 or max_concurrent < 1:
        raise UserError("demo: --num-samples and --max-concurrent must be >= 1")

    cfg = demo_sweep_config(out, num_samples=num_samples, max_concurrent=max_concurrent)
    logger.info("[1/4] activation cache: SmolLM2-135M on Shakespeare, %s -> %s",
                cfg.hook, out / "cache")
    build_cache(demo_cache_config(out, hooks=(cfg.hook,)))

    stored = load_sweep_info(cfg.experiment_path)
    if stored:
        if SweepConfig.from_dict(stored["config"]) != cfg:
            raise UserError(
                f"demo: {cfg.experiment_path} holds a sweep with other settings (e.g. "
                "--num-samples); pass a new --out or delete that folder")
        logger.info("[2/4] resuming the sweep in %s", cfg.experiment_path)
        resume_sweep(cfg.experiment_path)
    else:
        logger.info("[2/4] Optuna sweep on local Ray: %d trials, %d at a time -> %s",
                    num_samples, max_concurrent, cfg.experiment_path)
        run_sweep(cfg)

    logger.info("[3/4] best trials (%s, subject to %s):", cfg.objective.metric,
                "; ".join(c.as_query().replace("`", "") for c in cfg.objective.constraints))
    best = print_best(cfg.experiment_path, top=5)
    export_dir = out / "best_sae"
    export_trial(cfg.experiment_path, trial="best", out_dir=export_dir, output_format="saelens")
    logger.info("exported the best SAE (SAELens format) with its model card to %s", export_dir)

    plots = write_report(cfg.experiment_path)
    logger.info("[4/4] report: %d plot(s) in %s", len(plots),
                plots[0].parent if plots else cfg.experiment_path)
    return best
