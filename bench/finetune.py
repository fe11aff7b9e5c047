"""Does a short end-to-end fine-tune pay? Local-only vs local-then-KL-fine-tune, same budget.

On the embedded default (SmolLM2-135M-Instruct on Shakespeare), for each hook: a BatchTopK SAE
(d_sae, k) trained on ``--tokens`` training tokens

* ``local``: all of them on cached activations (MSE + AuxK);
* ``ft<f>``: the first ``1 - f`` locally, the last ``f`` as an end-to-end fine-tune (KL through
  the rest of the model + MSE, ``logit_kl_scale: mse``), the two-phase schedule of
  trainer/finetune.py; variants change the fine-tune length, its lr and the KL weight.

Every SAE is scored the same way, by its shipped (calibrated) encoder on the cache's **test**
split: ce_loss_delta (CE spliced - CE clean), the fraction of local-only's CE gap it closes,
kl_div, fvu and its held-out L0, plus the wall time of its training. Wall time including the
cache: the build rate of each kind of cache (activations only, stopping after the hooked block;
with the compact logits and splice residual, a full forward) is measured on a small sample in
the same run and charged per cached token: ``wall`` charges the fine-tune variants a cache with
logits for all their tokens (what one cache per job needs today); ``wall_2c`` charges only the
fine-tune's tokens at the logits rate (an activations cache plus a small logits cache: the
cost floor, which needs a job to read two caches -- not supported yet).

    .venv/bin/python bench/finetune.py --cache runs/cache-bench   # cache with logits, 2 hooks
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def cache_rates(sample_tokens: int, hook: str, model_spec: dict, seq_len: int) -> dict[str, float]:
    """Tokens/s of a cache build with activations only vs with logits + splice residual, on the
    cache's own model: real tokens over the build phase's seconds as the manifest records them
    (``build_seconds``: the model passes and the writes, after the model load and the corpus
    tokenization, which are the same for both and paid once per cache)."""
    from activation_cache import CacheConfig, build_cache, open_cache

    os.environ.setdefault("TQDM_DISABLE", "1")
    rates = {}
    for name, logits in (("activations", False), ("with_logits", True)):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = CacheConfig.from_dict(dict(
                output=os.path.join(tmp, "c"), model=model_spec, hooks=[hook],
                max_text_length=seq_len, max_tokens=sample_tokens, store_logits=logits,
                dtype="float16", val_fraction=0.0, test_fraction=0.0))
            manifest = open_cache(build_cache(cfg)).manifest
            tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
            rates[name] = tokens / max(float(manifest["build_seconds"]), 1e-9)
    return rates


def run(reader, hook: str, model, args, name: str, **training) -> dict:
    from trainer import (make_sae_config, TrainingConfig, build_sae, evaluate_split, job_sources,
                         train_sae)

    base = dict(max_tokens=args.tokens, train_batch_tokens=args.batch, lr=args.lr,
                log_freq=10**9, checkpoint_every=None, save_best=False, show_progress=False,
                eval_max_tokens=args.eval_tokens, batch_size=8,
                use_logit_kl=True, logit_kl_scale="mse", num_epochs=1000)
    base.update(training)
    cfg = TrainingConfig(**base)
    layer = int(hook.split(".")[1])
    sae = build_sae(make_sae_config(d_in=reader.d_in(hook), d_sae=args.d_sae, top_k=args.k,
                                    hook_layer=layer, hook_name=hook.split(".", 2)[2],
                                    threshold_warmup_steps=20), seed=0)
    s = job_sources(reader, cfg, hook, model=model)
    start = time.perf_counter()
    result = train_sae(sae, s.train, cfg, val_source=None, objective=s.objective,
                       reporter=_quiet())
    seconds = time.perf_counter() - start
    # one scorer for all: the end-to-end evaluation of the shipped SAE on the test windows
    scorer = job_sources(reader, cfg.replace(use_end_to_end=True, finetune_fraction=0.0), hook,
                         model=model)
    rec = evaluate_split(result.sae, scorer.test, cfg, split="test", objective=scorer.objective)
    return {"name": name, "hook": hook, "seconds": seconds, "ce_delta": rec.ce_loss_delta,
            "kl": rec.kl_div, "fvu": rec.fvu, "l0": rec.l0, "tokens": result.tokens_seen}




def _quiet():
    """The trainer's console reporter, writing nowhere (the bench prints its own table)."""
    import io

    from trainer import ConsoleReporter

    return ConsoleReporter(show_progress=False, stream=io.StringIO())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="a cache with logits and both hooks")
    ap.add_argument("--hooks", nargs="+",
                    default=["blocks.6.hook_resid_post", "blocks.20.hook_resid_post"])
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-sample", type=int, default=2048)
    ap.add_argument("--variants", default="full", choices=["full", "quick"])
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only these variants (local always runs: it is the reference)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from activation_cache import open_cache
    from trainer import load_cache_model

    reader = open_cache(args.cache)
    model = load_cache_model(reader)
    all_rates = {}
    for hook in args.hooks:
        spec = reader.manifest["config"]["model"]
        seq_len = int(reader.manifest["config"]["max_text_length"])
        all_rates[hook] = rates = cache_rates(args.cache_sample, hook, spec, seq_len)
        print(f"cache build at {hook}: activations only {rates['activations']:.0f} tok/s, with "
              f"logits + splice residual {rates['with_logits']:.0f} tok/s "
              f"({args.cache_sample} tokens each, {args.threads} threads)", flush=True)
    lr = args.lr
    variants = [("local", {})]
    ft = dict(use_end_to_end=True)
    variants.append(("ft5", dict(ft, finetune_fraction=0.05)))
    if args.variants == "full":
        variants += [("ft10", dict(ft, finetune_fraction=0.10)),
                     ("ft5 lr/50", dict(ft, finetune_fraction=0.05, finetune_lr=lr / 50)),
                     ("ft5 kl x3", dict(ft, finetune_fraction=0.05, logit_kl_weight=3.0)),
                     ("ft5 exact kl", dict(ft, finetune_fraction=0.05, logit_kl_clean="live")),
                     ("ft5 exact lr/50", dict(ft, finetune_fraction=0.05, logit_kl_clean="live",
                                              finetune_lr=lr / 50)),
                     ("ft5 kl fixed", dict(ft, finetune_fraction=0.05, logit_kl_scale="fixed",
                                           logit_kl_weight=1.0))]
    if args.only:
        variants = [v for v in variants if v[0] == "local" or v[0] in args.only]
    cached_tokens = args.tokens  # every approach caches its training tokens once
    print(f"tokens {args.tokens}, batch {args.batch}, d_sae {args.d_sae}, k {args.k}, lr {lr}; "
          f"scored on the test split ({args.eval_tokens} tokens)")
    print(f"{'hook':<26} {'variant':<14} {'ce_delta':>9} {'gap_closed':>10} {'kl':>7} "
          f"{'fvu':>7} {'l0':>6} {'train_s':>8} {'wall_s':>8} {'x_local':>7} {'wall_2c':>8} "
          f"{'x_local':>7}")
    for hook in args.hooks:
        rates = all_rates[hook]
        local = None
        for name, training in variants:
            r = run(reader, hook, model, args, name, **dict(training, logit_kl_weight=training.get(
                "logit_kl_weight", 1.0)))
            f = training.get("finetune_fraction", 0.0) if training.get("use_end_to_end") else 0.0
            rate = rates["with_logits"] if f > 0 else rates["activations"]
            wall = r["seconds"] + cached_tokens / rate
            wall2 = (r["seconds"] + (1 - f) * cached_tokens / rates["activations"]
                     + f * cached_tokens / rates["with_logits"])
            if local is None:
                local = dict(r, wall=wall)
            gap = (local["ce_delta"] - r["ce_delta"]) / local["ce_delta"]
            print(f"{hook:<26} {name:<14} {r['ce_delta']:>9.4f} {gap:>10.1%} {r['kl']:>7.4f} "
                  f"{r['fvu']:>7.4f} {r['l0']:>6.1f} {r['seconds']:>8.1f} {wall:>8.1f} "
                  f"{wall / local['wall']:>7.2f} {wall2:>8.1f} {wall2 / local['wall']:>7.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
