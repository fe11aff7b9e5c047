"""Sweep driver overhead and parallel efficiency, measured in one run on one machine.

The same N short trials (BatchTopK on a small cache of the tiny model, 1 CPU thread each) are
run three ways:

  S   one after another in this process, straight through ``trainer.train_sae``;
  W1  through the sweep driver (Ray Tune + Optuna, checkpoints, results tables), 1 at a time;
  W2  through the driver, 2 at a time.

Reported: per-trial driver overhead (W1 - S) / N; speedup S / W2 and parallel efficiency
S / (2 W2) with 2 concurrent trials (1.0 = perfect use of 2 cores). Trials draw their
hyperparameters from a seeded random sampler, so all three runs train identical trials.

    .venv/bin/python bench/sweep.py [--trials 4] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# This script shares its name with the package it measures: keep `import sweep` pointing at it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HOOK = "blocks.0.hook_resid_post"


def build_cache(path: Path) -> str:
    import random

    from activation_cache import CacheConfig, CorpusSpec, ModelSpec, build_cache as build

    texts = path.parent / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = "the king queen sword love death night day crown blood heart hand eye sea".split()
    for i in range(16):
        (texts / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(1500)))
    return build(CacheConfig(
        output=str(path), model=ModelSpec(source="tiny", n_ctx=128, tiny_d_model=128),
        corpus=CorpusSpec(source="files", paths=(str(texts),)), hooks=(HOOK,),
        max_text_length=128, batch_size=16, dtype="float32", shard_tokens=8192,
        max_tokens=30000, val_fraction=0.2))


def sweep_dict(cache: str, exp: Path, *, trials: int, steps: int, concurrent: int) -> dict:
    return {
        "cache": cache, "hook": HOOK, "experiment_dir": str(exp),
        "tokens_per_trial": steps * 1024,
        "sae": {"calibration_tokens": 2048, "threshold_warmup_steps": 10},
        "training": {"train_batch_tokens": 1024, "log_freq": 10, "checkpoint_every": 20,
                     "lr_warmup_steps": 5, "eval_max_tokens": 2048, "init_tokens": 2048,
                     "num_epochs": 1000},
        "search_space": {"d_sae": {"type": "categorical", "choices": [512, 1024]},
                         "top_k": {"type": "int", "low": 8, "high": 32, "log": True},
                         "lr": {"type": "float", "low": 1e-3, "high": 4e-3, "log": True}},
        "num_samples": trials, "max_concurrent_trials": concurrent,
        "resources_per_trial": {"cpu": 1}, "sampler": "random", "seed": 0, "max_failures": 0,
    }


def run_in_process(cfg, params_list: list[dict], d_in: int) -> float:
    """The same trials, one after another, in this process (1 thread); returns seconds."""
    import torch

    from activation_cache import open_cache
    from sweep.trial_configs import build_trial_configs
    from trainer import build_sae, train_sae

    torch.set_num_threads(1)
    cache = open_cache(cfg.cache)
    start = time.perf_counter()
    for params in params_list:
        sae_cfg, train_cfg = build_trial_configs(cfg, params, d_in)
        sae = build_sae(sae_cfg, seed=train_cfg.seed)
        with tempfile.TemporaryDirectory() as out:
            train_sae(sae, cache.token_source(cfg.hook, "train"), train_cfg,
                      val_source=cache.token_source(cfg.hook, "val"), out_dir=out,
                      reporter=_Quiet())
    return time.perf_counter() - start


class _Quiet:
    def on_train_start(self, **kw): pass
    def on_step(self, step): pass
    def on_metrics(self, record, checkpoint_dir): pass
    def on_message(self, text): pass
    def on_train_end(self, result): pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per trial")
    p.add_argument("--keep", default=None, help="keep the work folder here")
    args = p.parse_args(argv)

    import ray

    from sweep import SweepConfig, run_sweep
    from sweep.driver import cache_width

    load_before = os.getloadavg()[0]
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = build_cache(work / "cache")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        walls, frames = {}, {}
        for concurrent in (1, 2):
            exp = work / f"sweep_c{concurrent}"
            shutil.rmtree(exp, ignore_errors=True)
            cfg = SweepConfig.from_dict(sweep_dict(cache, exp, trials=args.trials,
                                                   steps=args.steps, concurrent=concurrent))
            start = time.perf_counter()
            frames[concurrent] = run_sweep(cfg)
            walls[concurrent] = time.perf_counter() - start
    finally:
        ray.shutdown()
    param_cols = ["d_sae", "top_k", "lr"]
    params = frames[1].sort_values("trial_id")[param_cols].to_dict("records")
    p1 = sorted(map(str, frames[1][param_cols].to_dict("records")))
    p2 = sorted(map(str, frames[2][param_cols].to_dict("records")))
    assert p1 == p2, "the two driver runs trained different trials"
    assert (frames[1]["status"] == "completed").all() and (frames[2]["status"] == "completed").all()
    seq = run_in_process(cfg, [{k: (int(v) if k != "lr" else float(v)) for k, v in p.items()}
                               for p in params], cache_width(cfg))

    n = args.trials
    w1, w2 = walls[1], walls[2]
    print(f"machine: {os.cpu_count()} CPUs, load average {load_before:.1f} before / "
          f"{os.getloadavg()[0]:.1f} after (other processes share the cores); "
          f"{n} trials x {args.steps} steps of 1024 tokens, 1 thread per trial")
    print(f"in-process, sequential (S):        {seq:8.1f} s  ({seq / n:.1f} s/trial)")
    print(f"driver, 1 at a time (W1):          {w1:8.1f} s  ({w1 / n:.1f} s/trial)")
    print(f"driver, 2 at a time (W2):          {w2:8.1f} s")
    print(f"per-trial driver overhead (W1-S)/N: {(w1 - seq) / n:7.2f} s")
    print(f"speedup S/W2: {seq / w2:.2f}x; parallel efficiency S/(2*W2): {seq / (2 * w2):.2f} "
          f"(driver-to-driver W1/(2*W2): {w1 / (2 * w2):.2f})")
    print(f"mean train_seconds inside trials: 1 at a time "
          f"{frames[1]['train_seconds'].mean():.1f} s, 2 at a time "
          f"{frames[2]['train_seconds'].mean():.1f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
