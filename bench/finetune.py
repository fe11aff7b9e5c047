"""Does the KL fine-tune pay at the published recipe? Local-only vs local-then-KL, same tokens.

What is measured (issue 19 item 1). On a cache with compact logits and splice residuals (default
/work/main/runs/cache-real: SmolLM2-135M on Shakespeare, 128-token windows), at each of
``--layers`` (``blocks.L.hook_resid_post``), BatchTopK SAEs (``--d-sae``, k ``--k`` fixed, so
the training L0 is the same for every row) are trained on the same total number of training
tokens T:

* ``local``: all T tokens locally on cached activations (MSE + AuxK, lr ``--lr`` with the
  default warm-up and decay), in batches of ``--batch`` tokens (several epochs of the split
  where T asks for it);
* ``local+kl``: the two-phase schedule (trainer/finetune.py): T - F tokens locally exactly as
  above, then F tokens of end-to-end fine-tune at the published recipe (Karvonen 2025,
  adamkarvonen/sae_kl_finetune): ``--ft-steps`` optimizer steps of ``--ft-seqs`` windows each,
  ``logit_kl_scale: balanced`` (alpha = MSE / KL every step, loss 0.5 x (alpha KL + MSE)),
  ``finetune_lr`` ``--ft-lr`` (5e-5) decaying linearly to 0 (``finetune_schedule: linear``),
  gradient clipping at 1.0, Adam's state carried over from the local phase;
* ``--also`` variants of local+kl at the last of ``--layers``: ``kl-only`` (no reconstruction
  term: ``reconstruction_loss_weight: 0``, the KL still scaled by alpha), ``lr10x`` (the
  fine-tune lr x 10), ``mse-once`` (``logit_kl_scale: mse``: the scale fixed on the first
  fine-tune batch, the earlier default of the demo).

F is the fine-tune's planned tokens (steps x windows x the split's mean train-mask tokens per
window), and local-only trains on those tokens too (T is the same). Every SAE is scored by its
shipped (calibrated) encoder on the cache's **test** split (``--eval-tokens`` tokens of whole
windows): ce_delta = CE(spliced) - CE(clean); ``gap_closed`` = the fraction of local-only's
ce_delta the row removes; the KL (clean || spliced, temperature 1, against the compact logits);
FVU; held-out L0; and the wall time of each phase (local: initialisation and local steps;
fine-tune: its steps and the threshold calibration), evaluation not included.

    flock /work/heavy.lock .venv/bin/python bench/finetune.py --threads 2        # ~30 min
    .venv/bin/python bench/finetune.py --estimate-only                          # the plan
    .venv/bin/python bench/finetune.py --quick                                  # smoke test
"""

from __future__ import annotations

import argparse
import io
import math
import os
import time
from typing import Any, Optional

import torch

DEFAULT_CACHE = "/work/main/runs/cache-real"
LOCAL_TOKENS_PER_S = 20_000.0
"""Planning figure: local training tokens/s on 2 cores (BatchTopK 2304, batch 2048)."""
E2E_TOKENS_PER_S_L6 = 190.0
"""Planning figure: end-to-end fine-tune tokens/s at layer 6 of SmolLM2-135M on 2 cores (its
cost is about proportional to the blocks after the splice)."""


EXTRA_VARIANTS = {
    "kl-only": lambda args: dict(reconstruction_loss_weight=0.0),
    "lr10x": lambda args: dict(finetune_lr=10 * args.ft_lr),
    "mse-once": lambda args: dict(logit_kl_scale="mse"),
}
"""``--also``: changes to the local+kl fine-tune, run at the last of ``--layers``."""


class PhaseClock:
    """A quiet reporter that notes when the local phase ends (the step ``boundary``) and keeps
    the trainer's messages."""

    def __init__(self, boundary: Optional[int]):
        self.boundary, self.started, self.at_boundary, self.messages = boundary, None, None, []

    def on_train_start(self, **kw: Any) -> None:
        pass

    def on_step(self, step: int) -> None:
        if step == self.boundary:
            self.at_boundary = time.perf_counter()

    def on_metrics(self, record: Any, checkpoint_dir: Any) -> None:
        pass

    def on_message(self, text: str) -> None:
        self.messages.append(text)

    def on_train_end(self, result: Any) -> None:
        pass


def plan(reader: Any, args: argparse.Namespace) -> dict[str, float]:
    """Fine-tune tokens F and total tokens T from the split's mean tokens per window."""
    split = reader.manifest["splits"]["train"]
    per_window = split["num_tokens"] / split["num_sequences"]
    ft_tokens = args.ft_steps * args.ft_seqs * per_window
    total = args.tokens if args.tokens else int(args.local_tokens + ft_tokens)
    return {"per_window": per_window, "ft_tokens": ft_tokens, "total": total,
            "fraction": ft_tokens / total}


def estimate_seconds(layer: int, n_layers: int, p: dict[str, float], args: argparse.Namespace,
                     extra: int) -> float:
    """Planned wall time at one layer (training and scoring), from the planning figures."""
    downstream = max(n_layers - layer - 1, 1) / (n_layers - 7)
    e2e_rate = E2E_TOKENS_PER_S_L6 / downstream
    local = 2 * p["total"] / LOCAL_TOKENS_PER_S  # local-only + the local phase (about)
    fine_tune = p["ft_tokens"] / e2e_rate * (1 + extra)
    scoring = (2 + extra) * 2 * args.eval_tokens / (3 * e2e_rate)  # 2 no-grad passes per row
    return local + fine_tune + scoring


def run(reader: Any, model: Any, hook: str, args: argparse.Namespace, p: dict[str, float],
        name: str, **training: Any) -> dict[str, Any]:
    from trainer import (TrainingConfig, build_sae, evaluate_split, job_sources, make_sae_config,
                         train_sae)

    base = dict(max_tokens=int(p["total"]), train_batch_tokens=args.batch, lr=args.lr,
                num_epochs=1000, log_freq=10**9, checkpoint_every=None, save_best=False,
                show_progress=False, eval_max_tokens=args.eval_tokens, seed=0)
    base.update(training)
    cfg = TrainingConfig(**base)
    layer = int(hook.split(".")[1])
    sae = build_sae(make_sae_config(d_in=reader.d_in(hook), d_sae=args.d_sae, top_k=args.k,
                                    hook_layer=layer, hook_name=hook.split(".", 2)[2],
                                    threshold_warmup_steps=20), seed=0)
    s = job_sources(reader, cfg, hook, model=model)
    boundary = None
    if cfg.finetune_fraction > 0:
        boundary = s.objective.phase_steps(s.train)[0]
    clock = PhaseClock(boundary)
    start = time.perf_counter()
    result = train_sae(sae, s.train, cfg, val_source=None, objective=s.objective, reporter=clock)
    end = time.perf_counter()
    local_s = (clock.at_boundary or end) - start
    ft_s = end - clock.at_boundary if clock.at_boundary else 0.0
    # one scorer for every row: the end-to-end evaluation of the shipped SAE on test windows
    score_cfg = TrainingConfig(use_end_to_end=True, batch_size=8, train_batch_tokens=args.batch,
                               eval_max_tokens=args.eval_tokens, show_progress=False)
    scorer = job_sources(reader, score_cfg, hook, model=model)
    rec = evaluate_split(result.sae, scorer.test, score_cfg, split="test",
                         objective=scorer.objective)
    ft_steps = result.steps - boundary if boundary is not None else 0
    return {"name": name, "hook": hook, "ce_delta": rec.ce_loss_delta, "kl": rec.kl_div,
            "fvu": rec.fvu, "l0": rec.l0, "local_s": local_s, "ft_s": ft_s,
            "steps": result.steps, "ft_steps": ft_steps, "tokens": result.tokens_seen,
            "messages": clock.messages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=DEFAULT_CACHE,
                    help="a cache with compact logits, splice residuals and the layers' hooks")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 20])
    ap.add_argument("--ft-steps", type=int, default=500, help="fine-tune optimizer steps")
    ap.add_argument("--ft-seqs", type=int, default=2, help="windows per fine-tune step")
    ap.add_argument("--ft-lr", type=float, default=5e-5, help="fine-tune peak lr")
    ap.add_argument("--local-tokens", type=int, default=320_000,
                    help="tokens of the local phase (T = these + the fine-tune's)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="total tokens T instead (overrides --local-tokens)")
    ap.add_argument("--batch", type=int, default=2048, help="local batch (tokens)")
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3, help="local lr")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="test tokens scored")
    ap.add_argument("--also", nargs="*", default=[], choices=sorted(EXTRA_VARIANTS),
                    help="extra variants at the last of --layers: kl-only (no reconstruction "
                         "term), lr10x (fine-tune lr x 10), mse-once (logit_kl_scale: mse, the "
                         "scale fixed on the first fine-tune batch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="tiny: 5 fine-tune steps, 8k local tokens, 1k test tokens, layer 20")
    ap.add_argument("--estimate-only", action="store_true",
                    help="print the plan and its planned wall time, train nothing")
    args = ap.parse_args()
    if args.quick:
        args.ft_steps, args.local_tokens, args.eval_tokens = 5, 8192, 1024
        args.layers = [20] if args.layers == [6, 20] else args.layers
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from activation_cache import open_cache

    reader = open_cache(args.cache)
    p = plan(reader, args)
    n_layers = 30  # SmolLM2-135M; the model says so once loaded
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in args.layers]
    missing = [h for h in hooks if h not in reader.hooks]
    if missing:
        raise SystemExit(f"the cache {args.cache} has no {', '.join(missing)} "
                         f"(it has {', '.join(reader.hooks)})")
    planned = sum(estimate_seconds(layer, n_layers, p, args,
                                   len(args.also) if i == len(hooks) - 1 else 0)
                  for i, layer in enumerate(args.layers))
    print(f"plan: T = {p['total']:,.0f} tokens per SAE; fine-tune {args.ft_steps} steps x "
          f"{args.ft_seqs} windows (~{p['ft_tokens']:,.0f} tokens, {p['fraction']:.1%} of T) at "
          f"lr {args.ft_lr:g} linear to 0, balanced KL; local lr {args.lr:g}, batch "
          f"{args.batch}; BatchTopK d_sae {args.d_sae} k {args.k}; test {args.eval_tokens} "
          f"tokens; layers {args.layers}; planned wall time ~{planned / 60:.0f} min on "
          f"{args.threads} threads", flush=True)
    if args.estimate_only:
        return
    from trainer import load_cache_model

    t0 = time.perf_counter()
    model = load_cache_model(reader)
    print(f"model loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    ft = dict(use_end_to_end=True, use_logit_kl=True, logit_kl_scale="balanced",
              logit_kl_weight=1.0, finetune_fraction=p["fraction"], finetune_lr=args.ft_lr,
              finetune_schedule="linear", finetune_batch_sequences=args.ft_seqs, batch_size=8,
              max_grad_norm=1.0)
    header = (f"{'layer':>5} {'variant':<9} {'ce_delta':>9} {'gap_closed':>10} {'kl':>7} "
              f"{'fvu':>7} {'l0':>6} {'ft_steps':>8} {'local_s':>8} {'ft_s':>7} {'x_local':>7}")
    rows = []
    print(header, flush=True)
    for i, hook in enumerate(hooks):
        variants = [("local", {}), ("local+kl", ft)]
        if i == len(hooks) - 1:
            variants += [(name, dict(ft, **EXTRA_VARIANTS[name](args))) for name in args.also]
        local = None
        for name, training in variants:
            r = run(reader, model, hook, args, p, name, **training)
            for m in r.pop("messages"):
                if m.startswith("warning"):
                    print(f"  [{name} at {hook}] {m}", flush=True)
            local = local or r
            gap = (local["ce_delta"] - r["ce_delta"]) / local["ce_delta"]
            wall = r["local_s"] + r["ft_s"]
            line = (f"{hook.split('.')[1]:>5} {name:<9} {r['ce_delta']:>9.4f} {gap:>10.1%} "
                    f"{r['kl']:>7.4f} {r['fvu']:>7.4f} {r['l0']:>6.1f} {r['ft_steps']:>8} "
                    f"{r['local_s']:>8.1f} {r['ft_s']:>7.1f} "
                    f"{wall / (local['local_s'] + local['ft_s']):>7.1f}")
            rows.append(line)
            print(line, flush=True)
    print()
    print(header)
    for line in rows:
        print(line)


if __name__ == "__main__":
    main()
