"""Does the proxy rank SAEs the way interpretability needs? (issue 17 figures)

Parts (``--part``, default all that exist):

* ``synthetic`` -- a sweep over the five SAE architectures (standard, topk, batchtopk, jumprelu,
  matryoshka_batchtopk) at L0 roughly 16-128 on a synthetic cache (activation_cache/synthetic.py:
  known sparse features), every trial scored by the ``ground_truth`` evaluator. Prints, over the
  completed trials: the Spearman rank correlation between FVU and feature_mcc (all of them, and
  those with 16 <= L0 <= 128), the feature_mcc of the FVU-best trial against that of the
  MCC-best trial (in that L0 band), each architecture's best, and the cost of each evaluator
  (seconds per trial, summed over a trial's evaluations, and as a share of its wall time).
  The sampler is random (not TPE), so the trials spread over the space instead of crowding
  where FVU is best.
* ``probing`` -- the same five architectures at L0 16-128 on a SmolLM2 cache with probe sets
  (``--probe-cache DIR``, built from examples/cache_probes.yaml with ``sae-sweep cache``), every
  trial scored by the ``probing`` evaluator: Spearman(test fvu, test probe_accuracy_k*), the
  probe accuracy of the FVU-best trial against the probe-best one, the raw-activation ceiling,
  and the evaluators' cost. Skipped (with a line saying so) without ``--probe-cache``.

    .venv/bin/python bench/interpretability.py [--trials 20] [--tokens 300000] [--keep DIR]

Heavy: run it under ``flock /work/heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

# This folder holds bench/sweep.py: keep `import sweep` pointing at the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

HOOK = "synthetic"
ARCHITECTURES = ["standard", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"]
L0_BAND = (16.0, 128.0)


# -- shared helpers (the probing part uses them too) ----------------------------------------------


def spearman(a: Any, b: Any) -> tuple[float, int]:
    """Spearman's rho of two columns over the rows where both are finite, and that count."""
    import numpy as np
    from scipy.stats import spearmanr

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan"), int(ok.sum())
    return float(spearmanr(x[ok], y[ok]).statistic), int(ok.sum())


def evaluator_costs(experiment: Path, results: Any) -> dict[str, tuple[float, float]]:
    """Per evaluator: (mean seconds per trial -- its time summed over the trial's validation
    records --, that as a share of the trial's training wall time), over completed trials."""
    from sweep import load_history

    history = load_history(experiment)
    done = results[results["status"] == "completed"].set_index("trial_id")
    out = {}
    for col in [c for c in history.columns if c.startswith("evaluator_seconds/")]:
        per_trial = history.groupby("trial_id")[col].sum()
        per_trial = per_trial[per_trial.index.isin(done.index)]
        if per_trial.empty:
            continue
        share = (per_trial / done.loc[per_trial.index, "train_seconds"]).mean()
        out[col.split("/", 1)[1]] = (float(per_trial.mean()), float(share))
    return out


# -- the synthetic part ------------------------------------------------------------------------------


def synthetic_cache(path: Path, tokens: int) -> str:
    from activation_cache import CacheConfig, build_cache

    return build_cache(CacheConfig.from_dict({
        "output": str(path), "hooks": [HOOK], "max_text_length": 128, "dtype": "float32",
        "val_fraction": 0.1, "test_fraction": 0.1,
        "synthetic": {"n_features": 512, "d": 128, "num_tokens": tokens, "mean_active": 32,
                      "frequency_exponent": 0.5, "magnitude_mean": 1.0, "magnitude_std": 0.25,
                      "noise_std": 0.01, "seed": 0}}))


def synthetic_sweep(cache: str, exp: Path, *, trials: int, tokens_per_trial: int) -> dict:
    return {
        "cache": cache, "hook": HOOK, "experiment_dir": str(exp),
        "tokens_per_trial": tokens_per_trial,
        "sae": {"d_sae": 1024, "n_batches_to_dead": 50},
        "training": {"train_batch_tokens": 1024, "log_freq": 100, "checkpoint_every": 200,
                     "eval_max_tokens": 8192, "num_epochs": 100,
                     "evaluators": ["ground_truth"]},
        "search_space": {
            "architecture": {"type": "categorical", "choices": ARCHITECTURES},
            "top_k": {"type": "int", "low": 16, "high": 128, "log": True},
            "l1_coefficient": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
            "l0_coefficient": {"type": "float", "low": 0.001, "high": 0.03, "log": True},
            "lr": {"type": "float", "low": 2e-3, "high": 1e-2, "log": True},
        },
        "objective": {"metric": "fvu", "mode": "min",
                      "constraints": [{"metric": "l0", "min": L0_BAND[0], "max": L0_BAND[1]}]},
        "num_samples": trials, "max_concurrent_trials": 2, "sampler": "random",
        "scheduler": {"type": "none"}, "resources_per_trial": {"cpu": 1}, "seed": 0,
        "max_failures": 0,
    }


def synthetic_part(args: argparse.Namespace) -> None:
    from sweep import SweepConfig, run_sweep

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-interp-"))
    work.mkdir(parents=True, exist_ok=True)
    exp = work / "sweep"
    if exp.exists():
        shutil.rmtree(exp)
    started = time.perf_counter()
    cache = synthetic_cache(work / "cache", args.tokens)
    built = time.perf_counter() - started
    cfg = SweepConfig.from_dict(synthetic_sweep(cache, exp, trials=args.trials,
                                                tokens_per_trial=args.tokens_per_trial))
    started = time.perf_counter()
    results = run_sweep(cfg)
    swept = time.perf_counter() - started
    done = results[results["status"] == "completed"].copy()
    band = done[(done["l0"] >= L0_BAND[0]) & (done["l0"] <= L0_BAND[1])]
    print(f"\n== synthetic: 512 features in 128 dims, ~32 active per token; {args.tokens:,} "
          f"tokens (cache {built:.1f} s); {len(done)}/{len(results)} trials completed, "
          f"{len(band)} with {L0_BAND[0]:g} <= L0 <= {L0_BAND[1]:g} (sweep {swept:.0f} s)")
    for label, rows in (("all completed", done), (f"L0 in [{L0_BAND[0]:g}, {L0_BAND[1]:g}]", band)):
        rho, n = spearman(rows["test_fvu"], rows["test_feature_mcc"])
        print(f"Spearman(test fvu, test feature_mcc), {label}: {rho:+.3f} (n={n}; negative = "
              "lower FVU goes with better recovery)")
        rho_l0, _ = spearman(rows["test_l0"], rows["test_feature_mcc"])
        print(f"  (Spearman(test l0, test feature_mcc), {label}: {rho_l0:+.3f}: how much of it is "
              "the L0 budget)")
    if len(band):
        fvu_best = band.loc[band["fvu"].idxmin()]
        mcc_best = band.loc[band["feature_mcc"].idxmax()]
        for name, row in (("FVU-best (val fvu)", fvu_best), ("MCC-best (val feature_mcc)",
                                                              mcc_best)):
            print(f"{name:28s} {row['trial_id']} {row['architecture']:21s} test fvu "
                  f"{row['test_fvu']:.4f}  test l0 {row['test_l0']:6.1f}  test feature_mcc "
                  f"{row['test_feature_mcc']:.4f}  recall@0.9 {row['test_feature_recall_0.9']:.3f}")
        print(f"same trial: {fvu_best['trial_id'] == mcc_best['trial_id']}; feature_mcc given up "
              f"by choosing on FVU: {mcc_best['test_feature_mcc'] - fvu_best['test_feature_mcc']:.4f}")
        print("per architecture (L0 band): best test feature_mcc / its test fvu / trials")
        for arch, rows in band.groupby("architecture"):
            r = rows.loc[rows["feature_mcc"].idxmax()]
            print(f"  {arch:21s} {r['test_feature_mcc']:.4f} / {r['test_fvu']:.4f} / {len(rows)}")
    print("evaluator cost (seconds per trial over its val records; share of training wall "
          "time):")
    for name, (secs, share) in evaluator_costs(exp, results).items():
        print(f"  {name:15s} {secs:8.3f} s  {100 * share:6.2f} %")
    print(f"(reconstruction's time is the objective's own evaluation pass; results in {exp})")


PROBE_HOOK = "blocks.6.hook_resid_post"


def probing_part(args: argparse.Namespace) -> None:
    from activation_cache import open_cache
    from sweep import SweepConfig, run_sweep

    if not args.probe_cache:
        print("\n== probing: skipped (give --probe-cache DIR: a cache built from "
              "examples/cache_probes.yaml)")
        return
    reader = open_cache(args.probe_cache)
    if not reader.probe_sets():
        print(f"\n== probing: skipped ({args.probe_cache} has no probe sets)")
        return
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-probe-"))
    exp = work / "probe-sweep"
    if exp.exists():
        shutil.rmtree(exp)
    d = reader.d_in(PROBE_HOOK)
    spec = synthetic_sweep(args.probe_cache, exp, trials=args.trials,
                           tokens_per_trial=args.tokens_per_trial)
    spec.update(hook=PROBE_HOOK)
    spec["sae"] = {"d_sae": 4 * d, "n_batches_to_dead": 50}
    spec["training"]["evaluators"] = ["probing"]
    started = time.perf_counter()
    results = run_sweep(SweepConfig.from_dict(spec))
    swept = time.perf_counter() - started
    done = results[results["status"] == "completed"]
    band = done[(done["l0"] >= L0_BAND[0]) & (done["l0"] <= L0_BAND[1])]
    print(f"\n== probing: {len(reader.probe_sets())} probe sets of {args.probe_cache}; "
          f"{len(done)}/{len(results)} trials completed, {len(band)} in the L0 band "
          f"(sweep {swept:.0f} s)")
    for k in (1, 2, 5, 20):
        rho, n = spearman(band["test_fvu"], band[f"test_probe_accuracy_k{k}"])
        print(f"Spearman(test fvu, test probe_accuracy_k{k}), L0 band: {rho:+.3f} (n={n}; "
              "negative = lower FVU goes with better probes)")
    if len(band):
        fvu_best = band.loc[band["fvu"].idxmin()]
        probe_best = band.loc[band["probe_accuracy_k5"].idxmax()]
        for name, row in (("FVU-best (val fvu)", fvu_best),
                          ("probe-best (val probe_accuracy_k5)", probe_best)):
            print(f"{name:35s} {row['trial_id']} {row['architecture']:21s} test fvu "
                  f"{row['test_fvu']:.4f}  test l0 {row['test_l0']:6.1f}  test k1/k5/k20 "
                  f"{row['test_probe_accuracy_k1']:.3f}/{row['test_probe_accuracy_k5']:.3f}/"
                  f"{row['test_probe_accuracy_k20']:.3f}")
        print(f"raw-activation probe (ceiling): {band['test_probe_accuracy_raw'].iloc[0]:.3f}")
    print("evaluator cost (seconds per trial; share of training wall time):")
    for name, (secs, share) in evaluator_costs(exp, results).items():
        print(f"  {name:15s} {secs:8.3f} s  {100 * share:6.2f} %")


PARTS: dict[str, Callable[[argparse.Namespace], None]] = {
    "synthetic": synthetic_part,
    "probing": probing_part,
}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=sorted(PARTS), action="append",
                    help="which part(s) to run (default: all)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=300_000, help="synthetic tokens generated")
    ap.add_argument("--tokens-per-trial", type=int, default=300_000)
    ap.add_argument("--probe-cache", help="a cache with probe sets (the probing part)")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    for name in args.part or list(PARTS):
        PARTS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
