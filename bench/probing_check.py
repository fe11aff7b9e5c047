"""Our sparse-probing figures next to sae-probes' own functions, on one probe set of a cache.

    .venv/bin/python bench/probing_check.py --cache runs/cache-smollm2-probes [--set glue_sst2]
        [--sae DIR] [--threads 2]

On the set's probe-train and probe-test parts (the pooled last-token activations the cache
stores) it computes, for the raw activations and for k = 1, 2, 5, 20 latents of an SAE (``--sae``:
a trained one; default: a seeded random ReLU encoder of width 8 d, enough to exercise the
latent ranking), the test accuracy twice: with trainer/evaluators/probing.py, and with
sae-probes 0.4.2's ``get_sorted_indices`` + ``mean_act_normalization`` (run_sae_evals) and
``find_best_reg`` (utils_training). It prints both and their difference. sae-probes imports
xgboost at module level for baselines this check does not use, so a stub module stands in for
it when xgboost is absent.
"""

from __future__ import annotations

import argparse
import sys
import types

import torch


def _import_sae_probes():
    if "xgboost" not in sys.modules:
        try:
            import xgboost  # noqa: F401
        except ImportError:
            sys.modules["xgboost"] = types.ModuleType("xgboost")
    from sae_probes.run_sae_evals import get_sorted_indices, mean_act_normalization
    from sae_probes.utils_training import find_best_reg

    return get_sorted_indices, mean_act_normalization, find_best_reg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--set", default=None, help="probe set (default: the cache's first)")
    ap.add_argument("--hook", default=None)
    ap.add_argument("--sae", default=None, help="a trained SAE folder (native or SAELens)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from activation_cache import open_cache
    from trainer.evaluators.probing import KS, SEED, probe_accuracy, sparse_probe_accuracies

    reader = open_cache(args.cache)
    name = args.set or reader.probe_sets()[0]
    hook = args.hook or reader.hooks[0]
    ps = reader.probe_set(name)
    xt, yt = ps.part("train", hook)
    xe, ye = ps.part("test", hook)
    if args.sae:
        from trainer import load_sae_folder

        sae = load_sae_folder(args.sae)
        encode = lambda x: sae.encode(x).detach().float()  # noqa: E731
        what = f"SAE {args.sae}"
    else:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(xt.shape[1], 8 * xt.shape[1], generator=g) / xt.shape[1] ** 0.5
        b = -0.5 * xt.std()
        encode = lambda x: torch.relu(x @ w + b)  # noqa: E731
        what = "a random ReLU encoder (8 d latents)"
    get_sorted_indices, mean_act_normalization, find_best_reg = _import_sae_probes()

    zt, ze = encode(xt), encode(xe)
    ours = sparse_probe_accuracies(zt, yt, ze, ye)
    ours_raw = probe_accuracy(xt.numpy(), yt.numpy(), xe.numpy(), ye.numpy())
    order = get_sorted_indices(zt, yt, mean_act_normalization)
    theirs = {}
    for k in KS:
        cols = order[:k]
        res = find_best_reg(zt[:, cols].numpy(), yt.numpy(), ze[:, cols].numpy(), ye.numpy(),
                            seed=SEED)
        theirs[k] = res.metrics.test_acc
    theirs_raw = find_best_reg(xt.numpy(), yt.numpy(), xe.numpy(), ye.numpy(),
                               seed=SEED).metrics.test_acc
    print(f"probe set {name} ({ps.source}), hook {hook}: {len(yt)} train / {len(ye)} test "
          f"texts; latents of {what}")
    print(f"{'probe':>8} {'ours':>8} {'sae-probes':>11} {'diff':>8}")
    for label, a, b in [("raw", ours_raw, theirs_raw)] + [(f"k={k}", ours[k], theirs[k])
                                                         for k in KS]:
        print(f"{label:>8} {a:8.4f} {b:11.4f} {a - b:+8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
