"""Two `sae-sweep cache` builds side by side: does each keep its share of the machine?

    .venv/bin/python bench/cache_side_by_side.py [--tokens 24000] [--hook blocks.6.hook_resid_post]

On the embedded SmolLM2-135M and the built-in Shakespeare corpus (windows of 128 tokens, a few
hundred of them), each run is a real `sae-sweep cache` process; the figure is the build's
tokens/s as its manifest records it (the hooked passes, encoding, hashing and writing of the
shards; model load and tokenization excluded). Four cases; the lone builds run before and after
the pairs and their mean is the reference (these machines drift):

1. one build alone with the default threads (the cores available to the process);
2. one build alone with ``--threads 1``;
3. two builds started together, ``--threads 1`` each (what the README recommends on a
   2-core machine: threads x jobs = cores);
4. two builds started together with the default threads each (oversubscribed: 2 x cores).

The goal: in case 3 each build keeps at least 40% of case 1's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def config(out: Path, tokens: int, hook: str) -> dict:
    return {"output": str(out), "hooks": [hook], "max_text_length": 128, "max_tokens": tokens,
            "batch_size": 8, "dtype": "float16", "val_fraction": 0.1}


def start(work: Path, name: str, tokens: int, hook: str, threads: int | None) -> subprocess.Popen:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = work / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config(out, tokens, hook)))
    cmd = [sys.executable, "-m", "sweep.cli", "cache", str(cfg)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, work: Path, name: str) -> float:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err[-2000:]}")
    manifest = json.loads((work / name / "manifest.json").read_text())
    tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
    return tokens / manifest["build_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=24_000, help="real tokens per build")
    ap.add_argument("--hook", default="blocks.6.hook_resid_post")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="cache-side-by-side-"))
    try:
        # warm-up: the model's one-time conversion and the file hashes, outside the figures
        finish(start(work, "warmup", 2_000, args.hook, None), work, "warmup")
        before = [finish(start(work, "lone", args.tokens, args.hook, threads), work, "lone")
                  for threads in (None, 1)]
        pair = [start(work, f"pair1-{i}", args.tokens, args.hook, 1) for i in (0, 1)]
        pair1 = [finish(p, work, f"pair1-{i}") for i, p in enumerate(pair)]
        pair = [start(work, f"pairN-{i}", args.tokens, args.hook, None) for i in (0, 1)]
        pair_n = [finish(p, work, f"pairN-{i}") for i, p in enumerate(pair)]
        after = [finish(start(work, "lone", args.tokens, args.hook, threads), work, "lone")
                 for threads in (None, 1)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lone, lone1 = [(a + b) / 2 for a, b in zip(before, after)]
    load = os.getloadavg()[0]
    print(f"cache builds of {args.tokens:,} tokens (SmolLM2-135M, {args.hook}, windows of 128, "
          f"fp16) on {cores} cores; load average {load:.1f} at the end")
    print(f"{'case':<48} {'tokens/s':>10} {'share of lone':>14}")
    print(f"(lone builds before / after the pairs: {before[0]:,.0f} / {after[0]:,.0f} tokens/s "
          f"with the default threads, {before[1]:,.0f} / {after[1]:,.0f} with --threads 1)")
    rows = [(f"lone, default threads ({cores}), mean", [lone]), ("lone, --threads 1, mean", [lone1]),
            ("side by side, --threads 1 each", pair1),
            (f"side by side, default threads ({cores}) each", pair_n)]
    for label, values in rows:
        for i, v in enumerate(values):
            name = label if len(values) == 1 else f"{label} [{i + 1}]"
            print(f"{name:<48} {v:>10,.0f} {v / lone:>13.0%}")
    best_lone = max(lone, lone1)
    ok = min(pair1) >= 0.4 * best_lone
    print(f"goal (each of two side-by-side builds with --threads 1 keeps >= 40% of the faster "
          f"lone build): {'met' if ok else 'NOT met'} ({min(pair1) / best_lone:.0%})")


if __name__ == "__main__":
    main()
