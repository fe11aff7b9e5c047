"""Model loading and tokenization costs of activation_cache (the fixed costs of every cache build
and every end-to-end training job).

    .venv/bin/python bench/model_load.py [--cold] [--threads 2]

Measures, on the embedded SmolLM2-135M and the built-in Shakespeare corpus:

1. ``--cold`` only: the one-time GGUF -> transformer_lens conversion (transformers de-quantises
   the GGUF, transformer_lens converts the weights, the result is written to a fresh cache);
2. a cached ``load_model`` (what every later run pays), best of 3;
3. sha256 of the 98 MB GGUF (identity; memoised after the first time per file version);
4. ``load_corpus`` + ``WindowedTextDataset`` over the whole corpus (tokens/s of windowing).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from activation_cache import CorpusSpec, ModelSpec, WindowedTextDataset, load_corpus, load_model  # noqa: E402
from activation_cache.model_spec import smollm2_gguf_path  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", action="store_true", help="also time the one-time conversion")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, str]] = []

    if args.cold:
        with tempfile.TemporaryDirectory(prefix="sae-sweep-bench-") as tmp:
            os.environ["SAE_SWEEP_CACHE_DIR"] = tmp
            _, dt = timed(lambda: load_model(ModelSpec()))
            os.environ.pop("SAE_SWEEP_CACHE_DIR")
        rows.append(("first load (GGUF conversion, fresh cache)", f"{dt:.1f} s"))

    model = load_model(ModelSpec())  # make sure the default cache holds the conversion
    best = min(timed(lambda: load_model(ModelSpec()))[1] for _ in range(3))
    rows.append(("cached load_model(ModelSpec())", f"{best:.2f} s"))

    gguf = smollm2_gguf_path()
    _, dt = timed(lambda: hashlib.sha256(gguf.read_bytes()).hexdigest())
    rows.append((f"sha256 of the GGUF ({gguf.stat().st_size / 1e6:.0f} MB)", f"{dt:.2f} s"))

    docs, dt_corpus = timed(lambda: load_corpus(CorpusSpec()))
    rows.append((f"load_corpus (Shakespeare, {len(docs)} documents)", f"{dt_corpus:.2f} s"))
    ds, dt = timed(lambda: WindowedTextDataset(docs, model.tokenizer, 128, n_ctx=model.cfg.n_ctx))
    rows.append((f"WindowedTextDataset, T=128 ({len(ds)} windows, {ds.num_tokens} tokens)",
                 f"{dt:.1f} s = {ds.num_tokens / dt:,.0f} tokens/s"))

    width = max(len(r[0]) for r in rows)
    print(f"torch threads: {args.threads}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
