"""One 3-hook suite against three one-hook sweeps with the same trials, on the same cache.

    flock /work/heavy.lock .venv/bin/python bench/suite.py [--cache runs/cache-real]
        [--tokens 40000] [--trials 2] [--threads 2] [--out runs/bench-suite]

Both arms run the same fixed trials (a categorical space with one choice per field, so every
trial of every hook trains the same configuration) with the same concurrency on one local Ray.
Reported per arm: wall time (driver start to end, Ray start-up included), the trials' summed
``train_seconds`` (the trainer's clock: the training loop with its evaluations) and its share
of wall x concurrency, and per hook the winner's test fvu / l0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
import sys

# bench/sweep.py would shadow the sweep package: the repository root goes first
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOOKS = ("blocks.6.hook_resid_post", "blocks.12.hook_resid_post", "blocks.20.hook_resid_post")


def sweep_dict(cache: str, exp: Path, tokens: int, trials: int, threads: int) -> dict:
    return {
        "cache": cache, "experiment_dir": str(exp), "tokens_per_trial": tokens,
        "sae": {"architecture": "batchtopk"},
        "training": {"train_batch_tokens": 1024, "log_freq": 20, "checkpoint_every": 20,
                     "eval_max_tokens": 2048, "lr_warmup_steps": 5},
        "search_space": {"expansion_factor": {"type": "categorical", "choices": [4]},
                         "top_k": {"type": "categorical", "choices": [32]}},
        "objective": {"metric": "fvu", "mode": "min", "constraints": [{"metric": "l0", "max": 64}]},
        "num_samples": trials, "max_concurrent_trials": 1,
        "resources_per_trial": {"cpu": threads}, "seed": 0,
    }


def run(data: dict) -> tuple[float, object]:
    from sweep import SweepConfig, run_sweep

    shutil.rmtree(data["experiment_dir"], ignore_errors=True)
    started = time.monotonic()
    results = run_sweep(SweepConfig.from_dict(data))
    return time.monotonic() - started, results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", default="/work/main/runs/cache-real")
    p.add_argument("--tokens", type=int, default=40_000)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench-suite")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = Path(args.out).resolve()
    rows = {}
    suite = sweep_dict(args.cache, out / "suite", args.tokens, args.trials, args.threads)
    suite["hooks"] = list(HOOKS)
    wall, results = run(suite)
    rows["suite"] = {"wall_s": wall, "train_s": float(results["train_seconds"].sum()),
                     "trials": len(results)}
    from sweep.results import load_sweep_info
    from sweep.suite_results import hook_winners

    winners = hook_winners(results, load_sweep_info(out / "suite"))
    figures = {r["hook"]: {k: r.get(k) for k in ("test_fvu", "test_l0", "fvu", "l0")}
               for _, r in winners.iterrows()}
    walls, train, n = 0.0, 0.0, 0
    for hook in HOOKS:
        one = sweep_dict(args.cache, out / f"one-{hook.split('.')[1]}", args.tokens, args.trials,
                         args.threads)
        one["hook"] = hook
        wall, res = run(one)
        walls += wall
        train += float(res["train_seconds"].sum())
        n += len(res)
        figures[hook]["one_hook_test_fvu"] = float(res["test_fvu"].min())
    rows["three one-hook sweeps"] = {"wall_s": walls, "train_s": train, "trials": n}
    for name, r in rows.items():
        r["train_share"] = r["train_s"] / r["wall_s"]
        print(f"{name:22s} wall {r['wall_s']:7.1f} s  training {r['train_s']:7.1f} s "
              f"({100 * r['train_share']:.0f}% of wall)  {r['trials']} trials")
    for hook, f in figures.items():
        print(f"{hook:28s} " + "  ".join(f"{k} {v:.4g}" for k, v in f.items() if v is not None))
    (out / "bench_suite.json").write_text(json.dumps({"arms": rows, "winners": figures,
                                                      "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
