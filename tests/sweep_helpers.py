"""Shared helpers of the sweep tests: a tiny real cache (public activation_cache API) and a tiny
sweep config over it."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

HOOK = "blocks.0.hook_resid_post"
_WORDS = ("the king queen sword love death night day crown blood heart hand eye storm sea "
          "ghost letter daughter father honour").split()


def build_tiny_cache(path: Path, *, max_tokens: int = 6000, store_logits: bool = False,
                     val_fraction: float = 0.25, hooks: tuple[str, ...] = (HOOK,)) -> str:
    """A cache of the tiny random model (d_in 64) on a few generated text files."""
    from activation_cache import CacheConfig, CorpusSpec, ModelSpec, build_cache

    os.environ.setdefault("TQDM_DISABLE", "1")
    texts = Path(str(path) + "-texts")
    texts.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(8):
        words = [rng.choice(_WORDS) for _ in range(500)]
        (texts / f"doc{i}.txt").write_text(" ".join(words))
    cfg = CacheConfig(
        output=str(path), model=ModelSpec(source="tiny", n_ctx=64),
        corpus=CorpusSpec(source="files", paths=(str(texts),)), hooks=tuple(hooks),
        max_text_length=64, batch_size=16, dtype="float32", shard_tokens=2048,
        max_tokens=max_tokens, val_fraction=val_fraction, store_logits=store_logits,
        logits_top_k=None if store_logits else 64)
    return build_cache(cfg)


def tiny_sweep(cache: str, experiment_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A sweep dict of a few short BatchTopK trials on the tiny cache."""
    data: dict[str, Any] = {
        "cache": cache,
        "hook": HOOK,
        "experiment_dir": str(experiment_dir),
        "tokens_per_trial": 4096,
        "sae": {"calibration_tokens": 512, "threshold_warmup_steps": 4},
        "training": {"train_batch_tokens": 256, "log_freq": 4, "checkpoint_every": 4,
                     "lr_warmup_steps": 0, "eval_max_tokens": 512, "init_tokens": 512,
                     "num_epochs": 50},
        "search_space": {
            "d_sae": {"type": "categorical", "choices": [128, 256]},
            "top_k": {"type": "int", "low": 4, "high": 16, "log": True},
        },
        "num_samples": 3,
        "max_concurrent_trials": 2,
        "resources_per_trial": {"cpu": 1},
        "max_failures": 1,
        "seed": 0,
    }
    data.update(overrides)
    return data
