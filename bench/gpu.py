"""The GPU path, measured in one short run: CUDA check, training step vs SAELens, reader into
device memory, and a 2-trial sweep sharing one GPU. Prints one figure per line (``name: value``).

    python bench/gpu.py             # a CUDA machine: about 3-5 minutes, set-up included
    python bench/gpu.py --dry-run   # anywhere: every step on the CPU at tiny sizes, no CUDA

What it does, in order (each part reports ``FAILED: ...`` and the run goes on if it breaks; the
exit status is 1 when any part failed):

1. ``cuda.*``  -- the GPU is there and computes: an fp32 and a bf16 matmul against the CPU, a
   pinned non-blocking copy there and back.
2. ``step.*``  -- one training step of our BatchTopK SAE vs SAELens's ``SAETrainer.step``
   (d_in 576, d_sae 4608 and 16384, k 32, batch 4096; fp32 and bf16 autocast with fp32 master
   weights), interleaved repetitions, medians of CUDA-synchronised wall times.
3. ``reader.*`` -- a synthetic fp16 cache (d_in 576), shuffled token batches into device memory:
   as stored in pinned memory, copied non-blocking and converted on the GPU
   (``token_source(dtype=None, pin_memory=True)`` + ``trainer.to_device``), vs float32 batches
   converted on the CPU; and the raw page-cache read of the same bytes.
4. ``sweep.*`` -- a 2-trial sweep with ``resources_per_trial.gpu: 0.5`` (both trials on one
   GPU, ``device: auto``) on that cache, through ``sweep.run_sweep``.

Self-contained: the cache comes from a stand-in "model" (fixed random token and position
embeddings, no transformer_lens or weights needed), written by the cache's own builder. It needs
torch, numpy, pandas, pyarrow, safetensors, pyyaml; SAELens for ``step.saelens*`` and Ray +
Optuna for ``sweep.*`` (a part whose package is missing says ``skipped``). ``--dry-run`` runs the
same code on the CPU with tiny sizes (Ray is told the node has one GPU, so the fractional-GPU
bookkeeping still runs), to check the script without a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/sweep.py would shadow the sweep package: import the packages from the repo root only
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

HOOK = "blocks.0.hook_resid_post"
FAILED: list[str] = []


def say(name: str, value: object) -> None:
    print(f"{name}: {value}", flush=True)


def part(name: str):
    """Run a part; a failure prints one line (and the traceback on stderr) and the run goes on."""
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ModuleNotFoundError as exc:
                say(name, f"skipped ({exc.name} is not installed)")
            except Exception as exc:  # noqa: BLE001 - reported, and the next part runs
                FAILED.append(name)
                say(name, f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                traceback.print_exc(file=sys.stderr)
        return run
    return wrap


def bench_module(name: str):
    """A sibling benchmark script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 1. CUDA works ------------------------------------------------------------------------------


@part("cuda")
def check_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        say("cuda", "skipped (dry run)")
        return
    props = torch.cuda.get_device_properties(device)
    say("cuda.device", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                       f"{props.multi_processor_count} SMs, torch {torch.__version__}, "
                       f"CUDA {torch.version.cuda}")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    ref = a.double() @ b.double()
    got = (a.to(device) @ b.to(device)).cpu().double()
    say("cuda.matmul_fp32_max_rel_err", f"{float((got - ref).abs().max() / ref.abs().max()):.1e}")
    got16 = (a.to(device, torch.bfloat16) @ b.to(device, torch.bfloat16)).cpu().double()
    say("cuda.matmul_bf16_max_rel_err", f"{float((got16 - ref).abs().max() / ref.abs().max()):.1e}")
    pinned = a.half().pin_memory()
    back = pinned.to(device, non_blocking=True).float().cpu()
    say("cuda.pinned_copy_exact", bool(torch.equal(back, a.half().float())))


# -- 2. the training step ------------------------------------------------------------------------


@part("step")
def training_steps(device: torch.device, args: argparse.Namespace) -> None:
    ts = bench_module("train_step")
    d_in, k, batch = args.d_in, args.k, args.batch
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, d_in, generator=gen) * 2.0 + 0.3).to(device)
    for d_sae in args.d_sae:
        for precision in ("fp32", "bf16"):
            name = f"step.d_sae_{d_sae}.{precision}"
            autocast = precision == "bf16"
            steps = {"ours": _make(name + ".ours", lambda: ts.OurStep(
                "batchtopk", d_sae, k_aux=d_in // 2, lr=1e-4, d_in=d_in, k=k, device=str(device),
                autocast=autocast))}
            steps["saelens"] = _make(name + ".saelens", lambda: ts.SaeLensStep(
                "batchtopk", d_sae, lr=1e-4, batch=batch, d_in=d_in, k=k, device=str(device),
                autocast=autocast))
            steps = {n: s for n, s in steps.items() if s is not None}
            times: dict[str, list[float]] = {n: [] for n in steps}
            for rep in range(args.warmup + args.reps):  # interleaved, warm-up first
                for n, impl in list(steps.items()):
                    try:
                        sync(device)
                        t0 = time.perf_counter()
                        impl.step(x)
                        sync(device)
                    except Exception as exc:  # noqa: BLE001
                        FAILED.append(f"{name}.{n}")
                        say(f"{name}.{n}", f"FAILED: {type(exc).__name__}: {exc}")
                        traceback.print_exc(file=sys.stderr)
                        del steps[n], times[n]
                        continue
                    if rep >= args.warmup:
                        times[n].append(time.perf_counter() - t0)
            rates = {n: batch / statistics.median(t) for n, t in times.items() if t}
            for n, rate in rates.items():
                say(f"{name}.{n}_tok_per_s", f"{rate:.4g} ({1e3 * batch / rate:.3f} ms/step)")
            if len(rates) == 2:
                say(f"{name}.speedup_vs_saelens", f"{rates['ours'] / rates['saelens']:.2f}x")


def _make(name: str, build):
    try:
        return build()
    except ModuleNotFoundError as exc:
        say(name, f"skipped ({exc.name} is not installed)")
    except Exception as exc:  # noqa: BLE001
        FAILED.append(name)
        say(name, f"FAILED: {type(exc).__name__}: {exc}")
    return None


# -- 3. the reader into device memory ------------------------------------------------------------


class _StandInModel:
    """What the cache builder needs from a model, without one: the activation of token t at
    position p is E[t] + P[p] (fixed random embeddings). Speeds and shapes are what matter."""

    def __init__(self, d_model: int, n_ctx: int, d_vocab: int = 512):
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.randn(d_vocab, d_model, generator=gen)
        self.pos = torch.randn(n_ctx, d_model, generator=gen) * 0.5
        self.cfg = SimpleNamespace(n_ctx=n_ctx, n_layers=1, d_vocab=d_vocab, d_vocab_out=d_vocab,
                                   device="cpu")
        self.hook_dict = {HOOK: None}
        self.tokenizer = SimpleNamespace(bos_token_id=1, pad_token_id=0)

    def run_with_cache(self, tokens, attention_mask=None, names_filter=(), stop_at_layer=None,
                       return_type=None):
        acts = self.embed[tokens] + self.pos[: tokens.shape[1]]
        return None, {HOOK: acts}


def synthetic_cache(out: Path, *, tokens: int, d_in: int, seq_len: int = 128) -> str:
    from activation_cache import CacheConfig, ModelSpec
    from activation_cache.builder import Windows, build_from_windows

    model = _StandInModel(d_in, seq_len)
    n = max(8, tokens // seq_len)
    rng = np.random.default_rng(0)
    toks = rng.integers(3, model.cfg.d_vocab, size=(n, seq_len))
    toks[:, 0] = 1
    docs = np.arange(n) // 4
    split = docs % 10 == 9  # a tenth of the documents are held out
    windows = {s: Windows(toks[m], np.ones((int(m.sum()), seq_len), bool), docs[m])
               for s, m in (("train", ~split), ("val", split))}
    cfg = CacheConfig(output=str(out), model=ModelSpec(source="tiny", n_ctx=seq_len),
                      hooks=(HOOK,), max_text_length=seq_len, dtype="float16",
                      shard_tokens=65536, batch_size=64, val_fraction=0.1)
    identity = {"name": "stand-in", "d_model": d_in, "n_ctx": seq_len}
    return build_from_windows(cfg, model, identity, windows)


@part("reader")
def reader_into_device(device: torch.device, cache: str, args: argparse.Namespace) -> None:
    from activation_cache import open_cache
    from trainer import to_device

    raw_read = bench_module("reader").raw_read
    reader = open_cache(cache)
    raw_read(reader, HOOK)  # page cache warm
    raw_s, nbytes = min((raw_read(reader, HOOK) for _ in range(3)), key=lambda r: r[0])
    n_tok = reader.num_tokens("train")
    say("reader.cache", f"{n_tok} train tokens, d_in {reader.d_in(HOOK)}, fp16, "
                        f"{nbytes / 1e9:.2f} GB")
    say("reader.raw_read_tok_per_s", f"{n_tok / raw_s:.4g} ({nbytes / raw_s / 1e9:.1f} GB/s)")
    pin = device.type == "cuda"
    for label, dtype in (("as_stored_converted_on_device", None), ("float32_on_cpu", torch.float32)):
        src = reader.token_source(HOOK, dtype=dtype, pin_memory=pin)
        best = float("inf")
        for epoch in range(3):  # epoch 0 verifies checksums: not counted
            sync(device)
            t0 = time.perf_counter()
            for batch in src.iter_batches(args.batch, seed=0, epoch=epoch):
                x = to_device(batch.input, device)
            sync(device)
            if epoch:
                best = min(best, time.perf_counter() - t0)
        assert x.dtype == torch.float32 and x.device.type == device.type
        say(f"reader.{label}_tok_per_s", f"{src.num_tokens / best:.4g} "
                                         f"({raw_s / best:.2f} of the raw read)")


# -- 4. a sweep sharing one GPU ------------------------------------------------------------------


@part("sweep")
def sweep_on_one_gpu(device: torch.device, cache: str, work: Path,
                     args: argparse.Namespace) -> None:
    import ray

    from sweep import SweepConfig, run_sweep

    cpus = os.cpu_count() or 2
    cfg = SweepConfig.from_dict({
        "cache": cache, "hook": HOOK, "experiment_dir": str(work / "sweep"),
        "tokens_per_trial": args.sweep_tokens,
        "sae": {"device": "auto", "d_sae": args.d_sae[0], "calibration_tokens": 4 * args.batch},
        "training": {"train_batch_tokens": args.batch, "log_freq": 50, "checkpoint_every": 200,
                     "eval_max_tokens": 4 * args.batch, "init_tokens": 4 * args.batch,
                     "num_epochs": 1000},
        "search_space": {"top_k": {"type": "categorical", "choices": [args.k, 2 * args.k]}},
        "num_samples": 2, "max_concurrent_trials": 2, "sampler": "random", "max_failures": 0,
        "time_budget_s": args.sweep_budget_s,  # a scheduling problem ends the part, not the run
        "resources_per_trial": {"cpu": max(1, cpus // 2), "gpu": 0.5},
    })
    # the GPUs torch sees (Ray's own detection may not work in a sandbox); a dry run declares
    # one, so Ray's fractional-GPU bookkeeping runs without a GPU
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables: not figures
            results = run_sweep(cfg)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    done = results[results["status"] == "completed"]
    statuses = {str(k): int(v) for k, v in results["status"].value_counts().items()}
    say("sweep.trials_completed", f"{len(done)} of {len(results)} ({statuses})")
    say("sweep.wall_s", f"{wall:.1f} (Ray start, 2 trials at gpu 0.5 each, results tables)")
    for _, row in done.iterrows():
        say(f"sweep.trial_top_k_{int(row['top_k'])}",
            f"{row['tokens_seen'] / row['train_seconds']:.4g} tok/s over "
            f"{row['train_seconds']:.1f} s of training, fvu {row['fvu']:.3f}, l0 {row['l0']:.1f}")
    if len(done) < len(results):
        FAILED.append("sweep")


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="everything on the CPU at tiny sizes (no CUDA timings)")
    p.add_argument("--skip", nargs="*", default=[], choices=["step", "reader", "sweep"])
    p.add_argument("--keep", default=None, help="keep the work folder (cache, sweep) here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        args.d_in, args.d_sae, args.k, args.batch = 64, [256, 512], 8, 256
        args.warmup, args.reps, args.cache_tokens, args.sweep_tokens = 1, 3, 20_000, 4096
        args.sweep_budget_s = 300
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py: CUDA is not available here (use --dry-run on a machine without "
                  "a GPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        args.d_in, args.d_sae, args.k, args.batch = 576, [4608, 16384], 32, 4096
        args.warmup, args.reps, args.cache_tokens, args.sweep_tokens = 5, 30, 1_000_000, 2_000_000
        args.sweep_budget_s = 240
    start = time.perf_counter()
    say("run", f"{'dry run (CPU, tiny sizes)' if args.dry_run else 'GPU'}; torch "
               f"{torch.__version__}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        check_cuda(device)
        if "step" not in args.skip:
            training_steps(device, args)
        if not {"reader", "sweep"} <= set(args.skip):
            t0 = time.perf_counter()
            cache = part("cache")(synthetic_cache)(work / "cache", tokens=args.cache_tokens,
                                                   d_in=args.d_in)
            if cache:
                say("cache.build_s", f"{time.perf_counter() - t0:.1f}")
                if "reader" not in args.skip:
                    reader_into_device(device, cache, args)
                if "sweep" not in args.skip:
                    sweep_on_one_gpu(device, cache, work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    say("total_s", f"{time.perf_counter() - start:.0f}")
    say("failed", ", ".join(FAILED) if FAILED else "none")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
