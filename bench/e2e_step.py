"""End-to-end training step on SmolLM2-135M: restart at the splice point vs the anchors' way.

Both variants do one training step of a BatchTopK SAE (d_in 576, d_sae 4608, k 32) with
reconstruction MSE + AuxK + logit_kl_weight x KL(clean || spliced), forward and backward, on the
same batch of real text windows (the built-in Shakespeare corpus):

* **ours** (``EndToEndObjective``): the hook's activations and compact clean logits (top-64) come
  from the cache, so one step runs only the blocks after the splice, once, with grad (in
  micro-batches), and backpropagates to the splice point;
* **anchors** (e2e_sae / sparsify): a clean forward of the whole model for the activations and
  the clean logits, then a spliced forward of the whole model from the embeddings, full-vocabulary
  KL, backward to the splice point.

The variants alternate within one run (``--reps`` times per layer) and the medians are compared,
because this shared CPU drifts by +-30 % minute to minute. Each step is timed twice: wall clock,
and this process's CPU time (``time.process_time``). With the default single thread the CPU time
is the work the step did, robust to other jobs on a shared machine (with several threads it would
also count threads spinning at barriers while a sibling is descheduled); the speed-ups are
quoted on both. Peak memory: the extra resident set
(RSS, sampled every millisecond) of one step in a fresh process per variant, above the RSS right
before the step (model, SAE and batch already loaded).

FLOP limits (SmolLM2: 30 blocks, the unembedding ~ 8 blocks; backward counted as 2 x forward as
in the issue's estimate): ~1.46x at layer 6, ~2.07x at layer 20. The backward pass here computes
no weight gradients for the frozen model (only input gradients, ~1 x forward), so the measured
ratio can exceed that estimate.

Run: ``.venv/bin/python bench/e2e_step.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_batch(model, hooks, n_seq, seq_len, top_k):
    """A SequenceBatch as the cache would serve it: acts at the hooks (and splice residuals) and
    compact clean logits, computed here with one clean forward (outside any timing)."""
    from activation_cache import (CorpusSpec, SequenceBatch, WindowedTextDataset, compact_logprobs,
                                  load_corpus)

    docs = load_corpus(CorpusSpec(max_documents=2))
    ds = WindowedTextDataset(docs, model.tokenizer, seq_len)
    full = ds.attention_mask.all(1)
    idx = torch.nonzero(full).flatten()[:n_seq]
    tokens, am, tm = ds.tokens[idx], ds.attention_mask[idx], ds.train_mask[idx]
    names = set(hooks)
    for h in hooks:
        names.add(f"blocks.{h.split('.')[1]}.hook_resid_pre")
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=am.long(),
                                             names_filter=sorted(names))
        lp, ix, lse = compact_logprobs(logits, top_k)
        nxt = F.log_softmax(logits.float(), -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        nxt = torch.cat([nxt, torch.full_like(nxt[:, :1], float("nan"))], 1)
    return SequenceBatch(tokens=tokens, attention_mask=am, train_mask=tm,
                         acts={n: cache[n].float().clone() for n in names},
                         clean_topk_logprobs=lp, clean_topk_indices=ix, clean_logsumexp=lse,
                         clean_next_token_logprob=nxt)


def make_sae(hook, batch, seed=0):
    from trainer import make_sae_config, build_sae

    layer, name = hook.split(".")[1], hook.split(".")[2]
    sae = build_sae(make_sae_config(d_in=576, d_sae=4608, top_k=32, hook_layer=int(layer),
                              hook_name=name), seed=seed)
    x = batch.acts[hook][batch.train_mask]
    sae.initialize_from_data(x, b_dec_init="mean")
    sae.train()
    return sae


def training_config():
    from trainer import TrainingConfig

    return TrainingConfig(use_end_to_end=True, use_logit_kl=True, logit_kl_weight=1.0,
                          activation_batch_size=64, show_progress=False)


def ours_step(model, sae, batch, objective):
    out = objective.step(sae, batch)
    out.loss.backward()
    return float(out.loss.detach())


def anchors_step(model, sae, batch, config):
    """The e2e_sae / sparsify way: two whole-model passes per step, full-vocabulary KL."""
    hook = str(sae.cfg.hook_spec)
    am = batch.attention_mask.long()
    mask = batch.train_mask
    with torch.no_grad():  # clean pass: the activations to encode and the clean logits
        clean_logits, cache = model.run_with_cache(batch.tokens, attention_mask=am,
                                                   names_filter=[hook])
    x = cache[hook]
    out = sae.training_forward(x[mask])
    recon = out["x_hat"].float() / sae.input_scale
    patch = torch.zeros_like(x).masked_scatter(mask[..., None], recon)

    def splice(value, hook):
        return torch.where(mask[..., None], patch, value)

    spliced = model.run_with_hooks(batch.tokens, attention_mask=am, fwd_hooks=[(hook, splice)])
    lp_clean = F.log_softmax(clean_logits.float(), -1)
    lp_spliced = F.log_softmax(spliced.float(), -1)
    kl = (lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1)[mask].mean()
    loss = (config.reconstruction_loss_weight * out["mse"] + sae.cfg.aux_penalty * out["aux"]
            + config.logit_kl_weight * kl)
    loss.backward()
    return float(loss.detach())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(args) -> None:
    """Child mode: one step of one variant in this fresh process; print its extra peak RSS."""
    from activation_cache import ModelSpec, load_model
    from trainer import EndToEndObjective

    torch.set_num_threads(args.threads)
    model = load_model(ModelSpec())
    hook = f"blocks.{args.layer}.{args.hook_name}"
    batch = build_batch(model, [hook], args.sequences, args.seq_len, args.top_k)
    sae = make_sae(hook, batch)
    cfg = training_config()
    objective = EndToEndObjective(model, cfg)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    before = _rss_bytes()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    if args.memory_variant == "ours":
        ours_step(model, sae, batch, objective)
    else:
        anchors_step(model, sae, batch, cfg)
    stop.set()
    thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    print(json.dumps({"extra_peak_rss_mb": (peak[0] - before) / 2**20,
                      "rss_before_mb": before / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[6, 20])
    p.add_argument("--hook-name", default="hook_resid_post")
    p.add_argument("--sequences", type=int, default=8, help="windows per batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--top-k", type=int, default=64, help="cached clean log-probs per token")
    p.add_argument("--reps", type=int, default=3, help="timed steps per variant and layer")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: CPU time measures work even on a busy machine)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-variant", choices=["ours", "anchors"], help=argparse.SUPPRESS)
    p.add_argument("--layer", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_variant:
        measure_memory(args)
        return

    from activation_cache import ModelSpec, load_model
    from trainer import EndToEndObjective

    torch.set_num_threads(args.threads)
    model = load_model(ModelSpec())
    hooks = [f"blocks.{layer}.{args.hook_name}" for layer in args.layers]
    batch = build_batch(model, hooks, args.sequences, args.seq_len, args.top_k)
    n_tok = int(batch.train_mask.sum())
    cfg = training_config()
    objective = EndToEndObjective(model, cfg)
    print(f"SmolLM2-135M fp32, {args.sequences} windows x {args.seq_len} tokens "
          f"({n_tok} train tokens), SAE 576 -> 4608 k=32, KL from top-{args.top_k} cached "
          f"logits (ours) vs full clean pass (anchors), {args.threads} threads, "
          f"{args.reps} interleaved reps; micro-batch {objective._micro(batch)} windows")
    for hook in hooks:
        sae = make_sae(hook, batch)
        wall = {"ours": [], "anchors": []}
        cpu = {"ours": [], "anchors": []}
        losses = {}
        for rep in range(args.reps + 1):  # the first round is a warm-up
            for name in ("ours", "anchors"):
                sae.zero_grad(set_to_none=True)
                t0, c0 = time.perf_counter(), time.process_time()
                if name == "ours":
                    losses[name] = ours_step(model, sae, batch, objective)
                else:
                    losses[name] = anchors_step(model, sae, batch, cfg)
                if rep:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        for label, times in (("CPU time", cpu), ("wall", wall)):
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{hook} [{label}]: ours {n_tok / med['ours']:.0f} tok/s "
                  f"({med['ours']:.2f} s/step), anchors {n_tok / med['anchors']:.0f} tok/s "
                  f"({med['anchors']:.2f} s/step), speed-up {med['anchors'] / med['ours']:.2f}x")
        print(f"{hook}: step losses {losses['ours']:.4f} (compact top-{args.top_k} KL) vs "
              f"{losses['anchors']:.4f} (full KL)", flush=True)
    if args.no_memory:
        return
    for layer in args.layers:
        line = []
        for variant in ("ours", "anchors"):
            cmd = [sys.executable, __file__, "--memory-variant", variant, "--layer", str(layer),
                   "--hook-name", args.hook_name, "--sequences", str(args.sequences),
                   "--seq-len", str(args.seq_len), "--top-k", str(args.top_k),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            mem = json.loads(out.strip().splitlines()[-1])
            line.append(f"{variant} +{mem['extra_peak_rss_mb']:.0f} MB")
        print(f"layer {layer} peak RSS of one step above the loaded state: {', '.join(line)}")


if __name__ == "__main__":
    main()
