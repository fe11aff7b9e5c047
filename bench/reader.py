"""Reader throughput: shuffled token batches (fp16 and fp32 caches) vs a raw sequential read of
the same bytes, and vs what a training step consumes. Prints one table; ratios come from one run.

    .venv/bin/python bench/reader.py                       # builds two synthetic caches
    .venv/bin/python bench/reader.py --cache runs/cache    # or measures an existing cache

Two outputs per cache: batches as stored (``token_source(hook, dtype=None)``, what a GPU trial
reads: the conversion happens on the device) and float32 batches (the CPU default). Epoch 0
includes the first-read sha256 verification; later epochs are measured ``--reps`` times,
interleaved with the raw read, and each side keeps its best (least disturbed) run.

Synthetic caches come from a random 1-layer model of SmolLM2's width (d_model 576) on random
tokens: the reader's speed depends on bytes and shapes, not on what the numbers mean.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from activation_cache import CacheConfig, ModelSpec, load_model, model_identity, open_cache  # noqa: E402
from activation_cache.builder import Windows, build_from_windows  # noqa: E402


def synthetic_cache(out: str, dtype: str, tokens: int, seq_len: int = 128) -> str:
    spec = ModelSpec(source="tiny", tiny_n_layers=1, tiny_d_model=576, tiny_n_heads=9,
                     tiny_d_mlp=64, n_ctx=seq_len)
    model = load_model(spec)
    n = tokens // seq_len
    rng = np.random.default_rng(0)
    toks = rng.integers(3, 259, size=(n, seq_len))
    toks[:, 0] = 1
    w = Windows(toks, np.ones((n, seq_len), bool), np.arange(n) // 4)
    empty = Windows(toks[:0], np.ones((0, seq_len), bool), np.arange(0))
    cfg = CacheConfig(output=out, model=spec, hooks=("blocks.0.hook_resid_post",),
                      max_text_length=seq_len, dtype=dtype, shard_tokens=65536, batch_size=32,
                      val_fraction=0.0)
    return build_from_windows(cfg, model, model_identity(model, spec), {"train": w, "val": empty})


def raw_read(reader, hook: str) -> tuple[float, int]:
    """Seconds to read the hook's tensor bytes of every train shard sequentially into one reused
    8 MiB buffer (plain ``readinto``, no processing): the floor any reader pays for the bytes."""
    key = f"acts.{hook}"
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    nbytes = 0
    for rec in reader.manifest["splits"]["train"]["shards"]:
        e = rec["tensors"][key]
        with open(reader.storage.full(rec["file"]), "rb", buffering=0) as f:
            f.seek(e["offset"])
            left = e["bytes"]
            while left:
                n = f.readinto(view[:min(left, len(buf))])
                nbytes += n
                left -= n
    return time.perf_counter() - t0, nbytes


def reader_epoch(source, batch_size: int, epoch: int) -> float:
    t0 = time.perf_counter()
    n = 0
    for b in source.iter_batches(batch_size, seed=0, epoch=epoch):
        n += b.input.shape[0]
    assert n == source.num_tokens
    return time.perf_counter() - t0


def trainer_step_rate(d_in: int, d_sae: int, k: int, batch: int, steps: int = 5) -> float:
    """Tokens/s of BatchTopK training steps (the trainer's own SAE and objective)."""
    from trainer import LocalObjective, TokenBatch, TrainingConfig, build_sae, make_sae_config

    sae = build_sae(make_sae_config(d_in=d_in, d_sae=d_sae, architecture="batchtopk", top_k=k))
    obj = LocalObjective(TrainingConfig())
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = TokenBatch.of(torch.randn(batch, d_in))
    obj.step(sae, x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        out = obj.step(sae, x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", action="append", default=None,
                   help="existing local cache folder(s) to measure")
    p.add_argument("--tokens", type=int, default=500_000, help="synthetic cache size")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--hook", default=None)
    p.add_argument("--reps", type=int, default=3, help="later epochs measured (best kept)")
    p.add_argument("--block-tokens", type=int, default=None,
                   help="the token source's block size (default: the reader's default)")
    p.add_argument("--no-trainer", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp(prefix="bench-reader-")
    caches = args.cache or [synthetic_cache(os.path.join(tmp, d), d, args.tokens)
                            for d in ("float16", "float32")]
    print(f"{'cache':>9} {'batches':>8} {'tokens':>8} {'raw GB/s':>8} {'raw tok/s':>10} "
          f"{'epoch0 tok/s':>12} {'later tok/s':>12} {'ratio0':>6} {'ratio':>6}")
    d_in = None
    for uri in caches:
        reader = open_cache(uri)
        hook = args.hook or reader.hooks[0]
        d_in = reader.d_in(hook)
        raw_read(reader, hook)  # warm the page cache for both sides
        for dtype, label in ((None, "stored"), (torch.float32, "float32")):
            reader = open_cache(uri)  # a fresh reader: epoch 0 verifies checksums again
            block = {"block_tokens": args.block_tokens} if args.block_tokens else {}
            src = reader.token_source(hook, dtype=dtype, **block)
            e0 = reader_epoch(src, args.batch_size, 0)
            raws, epochs = [], []
            for rep in range(args.reps):
                raws.append(raw_read(reader, hook)[0])
                epochs.append(reader_epoch(src, args.batch_size, rep + 1))
            raw_s, nbytes = min(raws), raw_read(reader, hook)[1]
            e1 = min(epochs)
            n = src.num_tokens
            print(f"{reader.manifest['act_dtype']:>9} {label:>8} {n:>8} {nbytes / raw_s / 1e9:>8.1f} "
                  f"{n / raw_s:>10.3g} {n / e0:>12.3g} {n / e1:>12.3g} {raw_s / e0:>6.2f} "
                  f"{raw_s / e1:>6.2f}")
    if not args.no_trainer and d_in is not None:
        rate = trainer_step_rate(d_in, 8 * d_in, 32, args.batch_size)
        print(f"trainer BatchTopK step (d_in={d_in}, d_sae={8 * d_in}, k=32, batch "
              f"{args.batch_size}, fp32, 2 threads): {rate:.0f} tok/s")
    print("epoch0 includes first-read sha256 verification; ratio = reader tok/s / raw tok/s "
          "(best of --reps later epochs vs best raw read); batches 'stored' = dtype=None")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
