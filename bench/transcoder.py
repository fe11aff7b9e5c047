"""Transcoders at L0 ~32: the MLP output's FVU from the MLP input, against an SAE that reads the
MLP output itself and against sparsify's own transcoder, on the same tokens.

Data: a cache that holds a block's MLP input and MLP output from the same pass
(``examples/cache_transcoder.yaml``: SmolLM2-135M layer 6, ``blocks.6.ln2.hook_normalized`` and
``blocks.6.hook_mlp_out``). Every row trains on **the same token stream** -- our cache reader's
shuffled ``(input, target)`` batches, in the same order, for the same number of steps -- and is
scored by **the same code** on the cache's **test** split: FVU of its reconstruction of the MLP
output and the mean L0 of its shipped encoder.

Rows (k = ``--k``, d_sae = ``--d-sae`` for all):

* ``ours/batchtopk_transcoder``, ``ours/batchtopk_skip_transcoder``: ``TrainingConfig()`` as
  shipped (``--lr`` aside); the shipped encoder is the JumpReLU with its calibrated threshold;
* ``ours/batchtopk SAE on hook_mlp_out``: the same recipe on the MLP output alone (it sees the
  answer: a reference for what a k-sparse code of the output reaches, not a transcoder);
* ``sparsify/transcoder`` and ``sparsify/skip_transcoder``: eai-sparsify 1.3.3's
  ``SparseCoder(transcode=True[, skip_connection=True])`` (TopK, exactly k per token) with its
  trainer's recipe replayed on the same batches: encoder bias ``-mean(x) @ W_enc``, ``b_dec =
  mean(y)`` and a zero decoder at the first batch, its default optimizer (sign-SGD under
  schedule-free, lr ``5e-3 / sqrt(d_sae / 2**14)``), FVU loss, no AuxK (its default
  ``auxk_alpha`` 0), scored with the schedule-free averaged weights (``optimizer.eval()``).

sparsify is never a dependency of sae-sweep: install it into the venv for this script only::

    .venv/bin/pip install --no-deps /tmp/wheels/eai_sparsify-1.3.3-py3-none-any.whl \\
        schedulefree simple-parsing natsort einops

Real run (a few minutes per row on CPU; the lead runs it on a quiet machine)::

    .venv/bin/sae-sweep cache examples/cache_transcoder.yaml
    .venv/bin/python bench/transcoder.py --cache runs/cache-smollm2-mlp6 --steps 1000

``--quick`` checks the script end to end in seconds on the tiny random model.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
import warnings
from typing import Any, Callable, Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def stream(source: Any, batch: int, steps: int, seed: int = 0) -> Iterator[Any]:
    """``steps`` TokenBatches of the source, epoch after epoch (our loop's order for seed 0)."""
    done, epoch = 0, 0
    while done < steps:
        for b in source.iter_batches(batch, seed=seed, epoch=epoch):
            yield b
            done += 1
            if done >= steps:
                return
        epoch += 1


@torch.no_grad()
def score(model: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], test: Any,
          max_tokens: int) -> tuple[float, float, int]:
    """(FVU of the target, mean L0, tokens) of ``model(x) -> (y_hat, codes)`` on the test
    batches, in float64."""
    sse = sum_y = sum_y2 = l0 = 0.0
    n = 0
    mean = None
    for b in test.iter_batches(4096, seed=0, epoch=0):
        x, y = b.input[: max_tokens - n].float(), b.target[: max_tokens - n].float()
        if x.shape[0] == 0:
            break
        y_hat, codes = model(x)
        y64 = y.double()
        sse += float((y_hat.double() - y64).pow(2).sum())
        s = y64.sum(0)
        mean = s if mean is None else mean + s
        sum_y2 += float(y64.pow(2).sum())
        l0 += float((codes > 0).sum())
        n += x.shape[0]
        if n >= max_tokens:
            break
    total = sum_y2 - float(mean.pow(2).sum()) / n
    return sse / total, l0 / n, n


# -- ours -----------------------------------------------------------------------------------


def train_ours(reader: Any, arch: str, hook: str, hook_out: str, args: Any) -> Any:
    from trainer import ConsoleReporter, TrainingConfig, build_sae, make_sae_config, train_sae

    layer, name = int(hook.split(".")[1]), hook.split(".", 2)[2]
    fields: dict[str, Any] = dict(d_in=reader.d_in(hook), d_sae=args.d_sae, architecture=arch,
                                  top_k=args.k, hook_layer=layer, hook_name=name)
    if hook_out != hook:
        fields.update(hook_spec_out=hook_out, d_out=reader.d_in(hook_out))
    sae = build_sae(make_sae_config(**fields), seed=0)
    cfg = TrainingConfig(max_tokens=args.steps * args.batch, train_batch_tokens=args.batch,
                         num_epochs=10**6, lr=args.lr, log_freq=10**9, checkpoint_every=None,
                         save_best=False, show_progress=False)
    source = reader.token_source(hook, "train", target_hook=None if hook_out == hook else hook_out)
    quiet = ConsoleReporter(show_progress=False, print_metrics=False, stream=io.StringIO())
    result = train_sae(sae, source, cfg, reporter=quiet)
    return result.sae.eval()


# -- sparsify -------------------------------------------------------------------------------


def train_sparsify(reader: Any, hook: str, hook_out: str, args: Any, *, skip: bool) -> Any:
    """sparsify's transcoder, its trainer's recipe on our batches (module docstring)."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    d_in = reader.d_in(hook)
    torch.manual_seed(0)
    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k,
                                                transcode=True, skip_connection=skip),
                        device="cpu", dtype=torch.float32)
    lr = 5e-3 / (coder.num_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=coder.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    source = reader.token_source(hook, "train", target_hook=hook_out)
    for step, b in enumerate(stream(source, args.batch, args.steps)):
        x, y = b.input.float(), b.target.float()
        if step == 0:  # sparsify's first-batch initialisation of a transcoder
            with torch.no_grad():
                coder.encoder.bias.data = -x.mean(0) @ coder.encoder.weight.data.T
                coder.b_dec.data = y.mean(0)
        out = coder(x, y)
        out.fvu.backward()
        opt.step()
        opt.zero_grad()
    opt.eval()  # schedule-free: the averaged weights are the ones to use
    return coder


def sparsify_model(coder: Any) -> Callable:
    def run(x: torch.Tensor):
        out = coder(x)
        codes = torch.zeros(x.shape[0], coder.num_latents).scatter_(
            1, out.latent_indices, out.latent_acts.float())
        return out.sae_out.float(), codes
    return run


# -- the tiny cache of --quick -----------------------------------------------------------------


def tiny_cache(folder: str) -> tuple[str, str, str]:
    from activation_cache import CacheConfig, CorpusSpec, ModelSpec, build_cache

    texts = os.path.join(folder, "texts")
    os.makedirs(texts, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    words = "the king queen sword love death night day crown blood heart hand eye".split()
    for i in range(12):
        picks = torch.randint(len(words), (400,), generator=g).tolist()
        with open(os.path.join(texts, f"doc{i}.txt"), "w") as f:
            f.write(" ".join(words[p] for p in picks))
    hook, hook_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    uri = build_cache(CacheConfig(
        output=os.path.join(folder, "cache"), model=ModelSpec(source="tiny", n_ctx=64),
        corpus=CorpusSpec(source="files", paths=(texts,)), hooks=(hook, hook_out),
        max_text_length=64, batch_size=16, dtype="float32", shard_tokens=2048,
        val_fraction=0.15, test_fraction=0.15, max_tokens=8000))
    return uri, hook, hook_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="runs/cache-smollm2-mlp6")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=2048, help="tokens per step")
    ap.add_argument("--lr", type=float, default=None,
                    help="our lr (default: TrainingConfig's); sparsify keeps its own rule")
    ap.add_argument("--test-tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-sparsify", dest="sparsify", action="store_false")
    ap.add_argument("--quick", action="store_true",
                    help="seconds-long check on the tiny random model (d_sae 256, k 8, 20 steps)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from activation_cache import open_cache
    from trainer import TrainingConfig

    if args.lr is None:
        args.lr = TrainingConfig().lr
    tmp = None
    if args.quick:
        tmp = tempfile.TemporaryDirectory()
        uri, hook, hook_out = tiny_cache(tmp.name)
        args.d_sae, args.k, args.steps, args.batch = 256, 8, 20, 256
    else:
        uri = args.cache
        hook, hook_out = (f"blocks.{args.layer}.ln2.hook_normalized",
                          f"blocks.{args.layer}.hook_mlp_out")
    reader = open_cache(uri)
    test = reader.token_source(hook, "test", target_hook=hook_out)
    print(f"{uri}: {hook} -> {hook_out}; d_sae {args.d_sae}, k {args.k}, {args.steps} steps of "
          f"{args.batch} tokens ({args.steps * args.batch:,} tokens; "
          f"{reader.num_tokens('train'):,} train tokens in the cache), scored on "
          f"{min(args.test_tokens, test.num_tokens):,} test tokens")

    rows: list[tuple[str, float, float, float]] = []

    def run(name: str, train: Callable[[], Any], model: Callable[[Any], Callable]) -> None:
        t0 = time.perf_counter()
        trained = train()
        seconds = time.perf_counter() - t0
        fvu, l0, _ = score(model(trained), test, args.test_tokens)
        rows.append((name, fvu, l0, seconds))
        print(f"  {name:<42} fvu {fvu:.4f}  l0 {l0:6.2f}  ({seconds:.0f} s)", flush=True)

    ours = lambda sae: (lambda x: sae(x))  # noqa: E731
    for arch in ("batchtopk_transcoder", "batchtopk_skip_transcoder"):
        run(f"ours/{arch}", lambda arch=arch: train_ours(reader, arch, hook, hook_out, args), ours)
    test_out = reader.token_source(hook_out, "test")
    sae_rows = len(rows)
    t0 = time.perf_counter()
    sae = train_ours(reader, "batchtopk", hook_out, hook_out, args)
    seconds = time.perf_counter() - t0
    fvu, l0, _ = score(lambda x: sae(x), test_out, args.test_tokens)  # reads the output itself
    rows.append(("ours/batchtopk SAE on hook_mlp_out", fvu, l0, seconds))
    print(f"  {rows[sae_rows][0]:<42} fvu {fvu:.4f}  l0 {l0:6.2f}  ({seconds:.0f} s)", flush=True)
    if args.sparsify:
        try:
            import sparsify  # noqa: F401
        except ImportError:
            print("  sparsify is not installed (see the module docstring): its rows are skipped")
        else:
            for skip in (False, True):
                name = "sparsify/" + ("skip_transcoder" if skip else "transcoder")
                run(name, lambda skip=skip: train_sparsify(reader, hook, hook_out, args,
                                                           skip=skip), sparsify_model)
    base = rows[0][1]
    print("\n| row | test FVU (MLP output) | test L0 | FVU / ours transcoder | train s |")
    print("|---|---|---|---|---|")
    for name, fvu, l0, seconds in rows:
        print(f"| {name} | {fvu:.4f} | {l0:.1f} | {fvu / base:.2f}x | {seconds:.0f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
