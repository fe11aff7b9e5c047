"""Cache build throughput vs the bare model forward, bytes per token, and compact-logits KL error.

    .venv/bin/python bench/cache.py [--windows 16] [--repeats 2]

On the embedded SmolLM2-135M and the built-in Shakespeare corpus (windows of 128 tokens):

1. build tokens/s (``build_from_windows``: hooked pass + compact logits + encoding, hashing and
   writing shards) against the bare ``model(tokens)`` forward on the same windows, same batch
   size, same layers, by wall time and by process CPU time (steadier on a shared machine; it
   includes the writer thread) -- for a local-loss cache (blocks.6.hook_resid_post, stop_at_layer=7) and
   an end-to-end cache (full pass, top-64 logits, splice residual). Runs are interleaved and the
   best of ``--repeats`` is kept for each side, so the ratio is measured side by side;
2. bytes per real token on disk for each stored item (fp16 activations);
3. the error of the compact KL (top-k + tail bucket, a lower bound) against the exact KL, for
   k = 32, 64, 128, where the "other" distribution is the model with Gaussian noise of 30% of
   the activation norm added at blocks.6.hook_resid_post (an SAE-like perturbation).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from activation_cache import CacheConfig, ModelSpec, compact_kl, compact_logprobs, load_model, model_identity, open_cache  # noqa: E402
from activation_cache.builder import Windows, build_from_windows, make_windows  # noqa: E402

HOOK = "blocks.6.hook_resid_post"


def bare_forward(model, w: Windows, batch_size: int, stop_at_layer) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the plain forward over the windows."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for a in range(0, len(w), batch_size):
            toks = torch.from_numpy(w.tokens[a:a + batch_size])
            am = torch.from_numpy(w.attention_mask[a:a + batch_size]).long()
            model(toks, attention_mask=am, stop_at_layer=stop_at_layer)
    return time.perf_counter() - t0, time.process_time() - c0


def timed_build(cfg: CacheConfig, model, ident, w: Windows) -> tuple[float, float, str]:
    """(wall seconds, process CPU seconds, uri) of a whole build over the windows."""
    shutil.rmtree(cfg.output, ignore_errors=True)
    empty = Windows(w.tokens[:0], w.attention_mask[:0], w.doc_id[:0])
    t0, c0 = time.perf_counter(), time.process_time()
    uri = build_from_windows(cfg, model, ident, {"train": w, "val": empty})
    return time.perf_counter() - t0, time.process_time() - c0, uri


def kl_errors(model, w: Windows, batch_size: int) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    rows = {k: [] for k in (32, 64, 128)}
    tails = {k: [] for k in rows}
    exact_all = []
    for a in range(0, len(w), batch_size):
        toks = torch.from_numpy(w.tokens[a:a + batch_size])
        am = torch.from_numpy(w.attention_mask[a:a + batch_size])

        def noise(act, hook):
            scale = act.norm(dim=-1, keepdim=True) / act.shape[-1] ** 0.5
            return act + 0.3 * scale * torch.randn(act.shape, generator=gen)

        with torch.inference_mode():
            clean = model(toks, attention_mask=am.long())
            other = model.run_with_hooks(toks, attention_mask=am.long(), fwd_hooks=[(HOOK, noise)])
        keep = am.clone()
        keep[:, 0] = False  # BOS position
        lp = torch.log_softmax(clean.float(), -1)
        exact = (lp.exp() * (lp - torch.log_softmax(other.float(), -1))).sum(-1)[keep]
        exact_all.append(exact)
        for k in rows:
            top, idx, _ = compact_logprobs(clean, k)
            rows[k].append(exact - compact_kl(top, idx, other)[keep])
            tails[k].append(1 - top.exp().sum(-1)[keep])
    exact = torch.cat(exact_all)
    out = []
    for k, errs in rows.items():
        e = torch.cat(errs)
        out.append((k, float(e.mean()), float(e.max()), float(e.mean() / exact.mean()),
                    float(exact.mean()), float(torch.cat(tails[k]).mean())))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=16, help="windows of 128 tokens to run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(2)
    spec = ModelSpec()
    model = load_model(spec)
    ident = model_identity(model, spec)
    tmp = tempfile.mkdtemp(prefix="bench-cache-")
    base = CacheConfig(output=os.path.join(tmp, "x"), hooks=(HOOK,), max_text_length=128,
                       batch_size=args.batch_size, dtype="float16", val_fraction=0.0)
    w = make_windows(base, model)["train"].take(0, args.windows)
    n_tokens = int(w.attention_mask.sum())
    print(f"SmolLM2-135M, {len(w)} windows x 128 ({n_tokens} real tokens), batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads")
    cases = [
        ("local: blocks.6 resid_post, stop_at_layer=7", base.replace(output=os.path.join(tmp, "a")), 7),
        ("e2e: + top-64 logits + splice residual, full pass",
         base.replace(output=os.path.join(tmp, "b"), store_logits=True, logits_top_k=64), None),
    ]
    manifests = {}
    for name, cfg, stop in cases:
        bare_forward(model, w.take(0, 1), 1, stop)  # warm-up
        bare, built = [], []
        for _ in range(args.repeats):
            bare.append(bare_forward(model, w, args.batch_size, stop))
            *cost, uri = timed_build(cfg, model, ident, w)
            built.append(tuple(cost))
        manifests[name] = open_cache(uri).manifest
        (bw, _), (cw, _) = min(bare), min(built)
        bcpu, ccpu = min(c for _, c in bare), min(c for _, c in built)
        print(f"{name}:\n  wall: bare forward {n_tokens / bw:8.1f} tok/s, cache build "
              f"{n_tokens / cw:8.1f} tok/s, build/bare = {bw / cw:.3f}   CPU time: build/bare = "
              f"{bcpu / ccpu:.3f}\n  all runs (wall tok/s): bare {[round(n_tokens / x, 1) for x, _ in bare]}, "
              f"build {[round(n_tokens / x, 1) for x, _ in built]}")
    print("bytes per real token on disk (fp16 activations; padding slots included):")
    for name, m in manifests.items():
        items = ", ".join(f"{k} {v:.1f}" for k, v in m["bytes_per_token"].items())
        print(f"  {name}: {items}")
    print("compact KL error vs exact KL(clean || noisy), non-BOS tokens "
          "(error = exact - compact >= 0):")
    for k, mean, mx, rel, exact, tail in kl_errors(model, w, args.batch_size):
        print(f"  k={k:4d}: mean error {mean:.5f} nats, max {mx:.5f}, mean error / mean KL "
              f"{rel:.4f} (mean exact KL {exact:.4f}; mean clean tail mass {tail:.3f})")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
