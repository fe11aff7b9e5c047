"""Does an architecture's L0 follow its sparsity setting on real activations? (issue 19 item 3)

Trains one SAE per ``--run`` on the cache's train split (``max_tokens`` tokens, batch
``--batch``, the default lr for d_sae unless ``--lr``) and scores the shipped encoder on the
test split: L0, FVU, dead fraction, and for JumpReLU the mean threshold; under ``target_l0`` the
final adapted coefficient. Each ``--run`` is ``HOOK:ARCH:key=value,key=value`` with flat
``sae:`` fields, e.g.::

    .venv/bin/python bench/jumprelu_l0.py --cache runs/cache-real \\
        --run blocks.12.hook_mlp_out:jumprelu:l0_coefficient=0.001 \\
        --run blocks.12.hook_mlp_out:jumprelu:target_l0=48
"""

from __future__ import annotations

import argparse
import io
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


class Trace:
    """Prints each validation record: step, training L0 and coefficient, val L0/FVU, theta."""

    def on_train_start(self, **kw):
        pass

    def on_step(self, step):
        pass

    def on_metrics(self, record, checkpoint_dir):
        terms = record.loss_terms
        print(f"  step {record.step}: train L0 {terms.get('l0', float('nan')):.1f}, "
              f"coefficient {terms.get('sparsity_coefficient', float('nan')):.4g}, "
              f"val L0 {record.l0:.1f}, val FVU {record.fvu:.3f}, "
              f"mean threshold {record.threshold}", flush=True)

    def on_message(self, text):
        pass

    def on_train_end(self, result):
        pass


def one_run(reader, spec: str, args) -> dict:
    from trainer import (ConsoleReporter, TrainingConfig, build_sae, evaluate_split,
                         make_sae_config, train_sae)

    hook, arch, *rest = spec.split(":")
    fields = {}
    for item in (rest[0].split(",") if rest and rest[0] else []):
        key, value = item.split("=")
        fields[key] = parse_value(value)
    train = reader.token_source(hook, "train")
    test = reader.token_source(hook, "test")
    cfg = make_sae_config(d_in=train.d_in, d_sae=args.d_sae, architecture=arch, **fields)
    extra = {"lr": args.lr} if args.lr else {}
    tc = TrainingConfig(max_tokens=args.max_tokens, train_batch_tokens=args.batch,
                        num_epochs=10**6, log_freq=args.log_freq or 10**9, checkpoint_every=None, save_best=False,
                        show_progress=False, eval_max_tokens=args.eval_tokens, **extra)
    sae = build_sae(cfg, seed=args.seed)
    t0 = time.perf_counter()
    trace = Trace() if args.log_freq else ConsoleReporter(show_progress=False,
                                                          stream=io.StringIO())
    val = reader.token_source(hook, "val") if args.log_freq else None
    result = train_sae(sae, train, tc, val_source=val, reporter=trace)
    seconds = time.perf_counter() - t0
    shipped = result.sae
    rec = evaluate_split(shipped, test, tc, split="test")
    out = {"hook": hook, "arch": arch, "fields": fields, "steps": result.steps,
           "l0": rec.l0, "fvu": rec.fvu, "dead": rec.dead_fraction, "s": seconds,
           "coef": shipped.sparsity_coefficients()}
    if hasattr(shipped, "theta"):
        out["theta"] = float(shipped.theta().detach().mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--run", action="append", required=True)
    p.add_argument("--d-sae", type=int, default=2304)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=200_000)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-freq", type=int, default=0,
                   help="print a validation record every this many steps (0: none)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from activation_cache import open_cache

    reader = open_cache(args.cache, verify=False)
    print("| hook | arch | settings | steps | test L0 | test FVU | dead | mean theta | "
          "final coefficient | s |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for spec in args.run:
        r = one_run(reader, spec, args)
        theta = f"{r['theta']:.3f}" if "theta" in r else "-"
        coef = ", ".join(f"{k} {v:.4g}" for k, v in r["coef"].items()) or "-"
        settings = ", ".join(f"{k}={v}" for k, v in r["fields"].items())
        print(f"| {r['hook']} | {r['arch']} | {settings} | {r['steps']} | {r['l0']:.1f} | "
              f"{r['fvu']:.3f} | {r['dead']:.3f} | {theta} | {coef} | {r['s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
