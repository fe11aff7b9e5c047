"""BatchTopK training-step benchmark: sae-sweep vs SAELens (CPU, fp32). Prints figures.

    .venv/bin/python bench/train_step.py                  # everything (~10 min on a quiet box)
    .venv/bin/python bench/train_step.py --d-sae 4608 --dead-fraction 0 --quality-tokens 0

1. Throughput. One full training step of each library on the same random activations
   (d_in=576, k=32, 4096 tokens, fp32, 2 threads), interleaved repetitions, medians:
   * ours: ``LocalObjective.step`` (BatchTopK forward + AuxK), backward, decoder-gradient
     projection, clipping, Adam, renormalisation and dead tracking -- the same calls, in the
     same order, as ``trainer.train_sae``'s step;
   * SAELens: ``SAETrainer.step`` of a ``BatchTopKTrainingSAE`` (forward, AuxK, backward,
     clipping, Adam, scheduler).
   Both get the same dead latents before every step (``--dead-fraction``; with 0 neither
   runs AuxK), with the same k_aux (SAELens hard-codes d_in / 2; ours is set to match). A plain fp32
   matmul of the encoder's shape is timed in the same loop for the GFLOP/s comparison.
2. Where our step's time goes (per-phase medians) and what bounds the speed-up.
3. Quality: held-out explained variance after the same token budget on the same structured
   synthetic data (sparse non-negative combinations of d_sae / 2 random directions, a mean
   offset, noise and a few high-norm tokens), ours via ``trainer.train_sae`` vs SAELens's
   trainer, same learning rate, each library's own initialisation and schedule. Both are
   scored the same way: BatchTopK encoding of held-out batches of 4096 tokens.

The machine drifts +-30% minute to minute, so only ratios measured within one run mean much.
OpenMP workers wait passively here (``OMP_WAIT_POLICY=PASSIVE`` unless the environment says
otherwise): on a shared, oversubscribed box, spinning workers steal the core their preempted
peer needs, which made every small parallel op several times slower. It applies to both
libraries alike (same process).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from trainer import (  # noqa: E402
    BatchTopKSAE, LocalObjective, SAEConfig, TensorSource, TrainingConfig, sparse_ops, train_sae)
from trainer.reporting import ConsoleReporter  # noqa: E402
from trainer.sparse_ops import auxk_reconstruct, batch_topk_indices, topk_sae_forward  # noqa: E402
from trainer.training import make_optimizer  # noqa: E402

D_IN, K = 576, 32


# --------------------------------------------------------------------------------------------
# The two training steps
# --------------------------------------------------------------------------------------------


class OurStep:
    """One sae-sweep training step, as ``trainer.train_sae`` runs it (``autocast``: the forward
    under bf16 autocast on ``device``)."""

    name = "sae-sweep"

    def __init__(self, d_sae: int, k_aux: int, lr: float, seed: int = 0, *, d_in: int = D_IN,
                 k: int = K, device: str = "cpu", autocast: bool = False):
        self.cfg = SAEConfig(d_in=d_in, d_sae=d_sae, top_k=k, top_k_aux=k_aux,
                             n_batches_to_dead=1000, device=device)
        self.autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
                         if autocast else contextlib.nullcontext())
        self.sae = BatchTopKSAE(self.cfg, seed=seed)
        self.config = TrainingConfig(lr=lr, outlier_policy="none")
        self.objective = LocalObjective(self.config)
        self.params = [p for p in self.sae.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.sae, self.config, lr)
        self.sae.train()

    def set_dead(self, dead: torch.Tensor) -> None:
        counts = self.sae.num_batches_not_active
        counts.zero_()
        counts[dead] = self.cfg.n_batches_to_dead

    def step(self, x: torch.Tensor, timer: Callable[[str], None] | None = None) -> None:
        tick = timer or (lambda name: None)
        sae = self.sae
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            out = self.objective.step(sae, x)
        if not bool(torch.isfinite(out.loss)):
            raise RuntimeError("the loss diverged")
        tick("forward (objective.step)")
        out.loss.backward()
        tick("backward")
        sae.project_decoder_gradients()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        tick("gradient projection + clipping")
        self.opt.step()
        tick("Adam step")
        sae.normalize_decoder()
        sae.update_training_state(out.fired, update_threshold=True)
        tick("renormalisation + dead tracking")


class SaeLensStep:
    """One SAELens ``SAETrainer.step`` of a BatchTopK training SAE."""

    name = "SAELens"

    def __init__(self, d_sae: int, lr: float, total_steps: int = 10**6, batch: int = 4096, *,
                 d_in: int = D_IN, k: int = K, device: str = "cpu", autocast: bool = False):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        cfg = BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32",
                                         device=device)
        self.sae = BatchTopKTrainingSAE(cfg)
        tcfg = SAETrainerConfig(total_training_samples=total_steps * batch,
                                train_batch_size_samples=batch, lr=lr, lr_end=lr,
                                dead_feature_window=1000, device=device, autocast=autocast)
        self.trainer = SAETrainer(cfg=tcfg, sae=self.sae, data_provider=iter(()))

    def set_dead(self, dead: torch.Tensor) -> None:
        counts = self.trainer.n_forward_passes_since_fired
        counts.zero_()
        counts[dead] = self.trainer.cfg.dead_feature_window + 1

    def step(self, x: torch.Tensor) -> None:
        self.trainer.step(x)
        self.trainer.n_training_steps += 1


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def throughput(d_sae: int, n_tok: int, reps: int, dead_fraction: float, lr: float) -> dict:
    gen = torch.Generator().manual_seed(d_sae)
    batches = [torch.randn(n_tok, D_IN, generator=gen) * 2.0 + 0.3 for _ in range(2)]
    dead = torch.rand(d_sae, generator=gen) < dead_fraction
    ours, theirs = OurStep(d_sae, k_aux=D_IN // 2, lr=lr), SaeLensStep(d_sae, lr=lr)
    a = batches[0]
    w = torch.randn(D_IN, d_sae, generator=gen)
    times: dict[str, list[float]] = {"ours": [], "saelens": [], "matmul": []}
    cpu: dict[str, list[float]] = {"ours": [], "saelens": []}
    for rep in range(reps + 1):  # the first round is a warm-up
        x = batches[rep % len(batches)]
        for name, impl in (("ours", ours), ("saelens", theirs)):
            impl.set_dead(dead)
            c0, t0 = time.process_time(), time.perf_counter()
            impl.step(x)
            if rep:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        t0 = time.perf_counter()
        torch.mm(a, w)
        if rep:
            times["matmul"].append(time.perf_counter() - t0)
    t_ours, t_theirs, t_mm = (statistics.median(times[k]) for k in ("ours", "saelens", "matmul"))
    gemm_flop = 2.0 * n_tok * D_IN * d_sae
    # executed work of our step: the dense encoder GEMM, four sparse passes of 2*M*d_in over the
    # k*N selected pairs (decode, dv, dW_dec, dW_enc), and AuxK (four GEMMs over the dead
    # columns, or four sparse passes over its pairs when those are few)
    n_dead = int(dead.sum())
    k_aux = min(D_IN // 2, n_dead)
    if n_dead and k_aux / n_dead >= sparse_ops._AUXK_DENSE_DENSITY:
        aux_flop = 4 * 2.0 * n_tok * n_dead * D_IN
    else:
        aux_flop = 4 * 2.0 * n_tok * k_aux * D_IN
    ours_flop = gemm_flop + 4 * 2.0 * K * n_tok * D_IN + aux_flop
    return {
        "d_sae": d_sae, "dead": int(dead.sum()),
        "tok_s_ours": n_tok / t_ours, "tok_s_saelens": n_tok / t_theirs,
        "ratio": t_theirs / t_ours,
        "cpu_ratio": statistics.median(cpu["saelens"]) / statistics.median(cpu["ours"]),
        "matmul_gflops": gemm_flop / t_mm / 1e9,
        "ours_gflops": ours_flop / t_ours / 1e9,
        "ours_dense_equiv_gflops": 6 * gemm_flop / t_ours / 1e9,
        "ours_gflop": ours_flop / 1e9, "gemm_gflop": gemm_flop / 1e9,
        "t_ours_ms": 1e3 * t_ours, "t_saelens_ms": 1e3 * t_theirs, "t_matmul_ms": 1e3 * t_mm,
        "ours": ours,
    }


def phase_breakdown(ours: OurStep, n_tok: int, reps: int, dead_fraction: float) -> dict:
    """Per-phase medians of our step (``forward`` .. ``renormalisation``), and, timed alone in
    the same loop, its parts: the dense encoder GEMM, the exact selection, the whole BatchTopK
    kernel (forward + backward of the reconstruction loss) and the AuxK term (forward +
    backward)."""
    d_sae = ours.cfg.d_sae
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_tok, D_IN, generator=gen) * 2.0 + 0.3
    dead = torch.rand(d_sae, generator=gen) < dead_fraction
    phases: dict[str, list[float]] = {}
    sae = ours.sae
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)

    def record(name: str, seconds: float) -> None:
        phases.setdefault(name, []).append(seconds)

    for rep in range(reps + 1):
        ours.set_dead(dead)
        stamps = [("start", time.perf_counter())]
        ours.step(x, timer=lambda name: stamps.append((name, time.perf_counter())))
        parts = {}
        xs = sae.scale_input(x)
        with torch.no_grad():
            t0 = time.perf_counter()
            pre = torch.addmm(sae.b_enc, xs - sae.b_dec, sae.W_enc)
            t1 = time.perf_counter()
            batch_topk_indices(pre, K * n_tok)
            parts["encoder GEMM (dense)"] = t1 - t0
            parts["exact top-k selection"] = time.perf_counter() - t1
        t0 = time.perf_counter()
        out = topk_sae_forward(xs, *params, K)
        (out.x_hat - xs).pow(2).mean().backward()
        parts["BatchTopK kernel, forward + backward"] = time.perf_counter() - t0
        residual = (xs - out.x_hat).detach()
        t0 = time.perf_counter()
        aux = auxk_reconstruct(xs, *params, out.pre_acts, dead, ours.cfg.top_k_aux)
        if aux.e_hat.requires_grad:  # no dead latent: nothing to backpropagate
            (aux.e_hat - residual).pow(2).mean().backward()
        parts["AuxK, forward + backward"] = time.perf_counter() - t0
        ours.opt.zero_grad(set_to_none=True)
        if rep:
            for (_, a), (name, b) in zip(stamps, stamps[1:]):
                record(name, b - a)
            record("total step", stamps[-1][1] - stamps[0][1])
            for name, seconds in parts.items():
                record(f"  part: {name}", seconds)
    return {name: median_ms(v) for name, v in phases.items()}


# --------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------


def synthetic_activations(n_tok: int, n_features: int, seed: int, active: int = 16) -> torch.Tensor:
    """Sparse non-negative codes over a random unit dictionary of ``n_features`` directions with
    Zipf-like frequencies (``active`` per token on average), a mean offset, 5% noise and 1% of
    tokens with 4x the norm; scaled so that E||x|| = sqrt(d_in), which both libraries expect."""
    gen = torch.Generator().manual_seed(1234)  # the dictionary and offset are shared by splits
    dictionary = torch.randn(n_features, D_IN, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    offset = torch.randn(D_IN, generator=gen) * 0.5
    freq = 1.0 / (torch.arange(n_features, dtype=torch.float64) + 20.0) ** 0.7
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(freq.float(), active * n_tok, replacement=True, generator=gen)
    mags = torch.empty(active * n_tok).exponential_(1.0, generator=gen) + 0.2
    tokens = torch.arange(n_tok).repeat_interleave(active)
    codes = torch.zeros(n_tok, n_features)
    codes.index_put_((tokens, idx), mags, accumulate=True)
    x = codes @ dictionary + offset + 0.05 * torch.randn(n_tok, D_IN, generator=gen)
    heavy = torch.rand(n_tok, generator=gen) < 0.01
    x[heavy] *= 4.0
    return x * (math.sqrt(D_IN) / x.norm(dim=1).mean())


@torch.no_grad()
def explained_variance(reconstruct: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       batch: int = 4096) -> float:
    err = sum(float((xb - reconstruct(xb)).pow(2).sum()) for xb in x.split(batch))
    return 1.0 - err / float((x - x.mean(0)).pow(2).sum())


def quality(d_sae: int, tokens: int, batch: int, lr: float, seed: int = 0) -> dict:
    n_train = min(tokens, 65536)
    train = synthetic_activations(n_train, n_features=d_sae // 2, seed=1)
    held_out = synthetic_activations(8192, n_features=d_sae // 2, seed=2)
    source = TensorSource(train)
    epochs = math.ceil(tokens / n_train)
    steps = tokens // batch

    cfg = SAEConfig(d_in=D_IN, d_sae=d_sae, top_k=K, top_k_aux=D_IN // 2)
    ours = BatchTopKSAE(cfg, seed=seed)
    tcfg = TrainingConfig(num_epochs=epochs, max_tokens=tokens, train_batch_tokens=batch, lr=lr,
                          log_freq=10**9, checkpoint_every=None, eval_max_tokens=8192, seed=seed)
    t0 = time.perf_counter()
    result = train_sae(ours, source, tcfg, val_source=TensorSource(held_out, shuffle=False),
                       reporter=ConsoleReporter(show_progress=False, stream=io.StringIO()))
    t_ours = time.perf_counter() - t0
    ours.train()
    ev_ours = explained_variance(lambda xb: ours(xb)[0], held_out)

    theirs = SaeLensStep(d_sae, lr=lr, total_steps=steps, batch=batch)
    t0 = time.perf_counter()
    done = 0
    for epoch in range(epochs):  # the same batches, in the same order
        for xb in source.iter_batches(batch, seed=seed, epoch=epoch):
            if done >= steps:
                break
            theirs.step(xb)
            done += 1
    t_theirs = time.perf_counter() - t0
    theirs.sae.train()
    ev_theirs = explained_variance(lambda xb: theirs.sae(xb), held_out)
    return {"tokens": steps * batch, "steps": steps, "batch": batch, "ev_ours": ev_ours,
            "ev_ours_inference": result.final.explained_variance_inference
            if result.final is not None else float("nan"),
            "ev_saelens": ev_theirs, "t_ours_s": t_ours, "t_saelens_s": t_theirs,
            "dead_ours": ours.dead_feature_percentage()}


# --------------------------------------------------------------------------------------------


def report_throughput(d_sae: int, dead_fraction: float, args: argparse.Namespace) -> None:
    r = throughput(d_sae, args.tokens, args.reps, dead_fraction, args.lr)
    print(f"\n== d_sae={d_sae}, {r['dead']} dead latents ({dead_fraction:.0%}) ==")
    print(f"  sae-sweep step : {r['tok_s_ours']:8.0f} tok/s  ({r['t_ours_ms']:.0f} ms/step)")
    print(f"  SAELens step   : {r['tok_s_saelens']:8.0f} tok/s  ({r['t_saelens_ms']:.0f} ms/step)")
    print(f"  speed-up       : {r['ratio']:.2f}x wall time "
          f"({r['cpu_ratio']:.2f}x in process CPU time, less sensitive to other load)")
    print(f"  plain fp32 matmul [{args.tokens}x{D_IN}]@[{D_IN}x{d_sae}]: "
          f"{r['matmul_gflops']:.0f} GFLOP/s ({r['t_matmul_ms']:.0f} ms)")
    print(f"  our step: {r['ours_gflop']:.1f} GFLOP executed (encoder GEMM "
          f"{r['gemm_gflop']:.1f}) -> {r['ours_gflops']:.0f} GFLOP/s, "
          f"{100 * r['ours_gflops'] / r['matmul_gflops']:.0f}% of the matmul's rate; "
          f"{r['ours_dense_equiv_gflops']:.0f} GFLOP/s counted as a dense step's 6 GEMMs")
    phases = phase_breakdown(r["ours"], args.tokens, args.reps, dead_fraction)
    total = phases["total step"]
    print("  our step, per phase (medians of a separate interleaved run; parts timed alone):")
    for name, ms in phases.items():
        print(f"    {name:44s} {ms:7.1f} ms  {100 * ms / total:5.1f}%")
    gemm = phases["  part: encoder GEMM (dense)"]
    print(f"  bound: the dense encoder GEMM alone is {100 * gemm / total:.0f}% of our step; "
          f"a step that did nothing else would be {r['t_saelens_ms'] / gemm:.1f}x SAELens "
          f"(measured {r['ratio']:.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-sae", type=int, nargs="*", default=[4608, 9216],
                    help="dictionary sizes of the throughput runs (none: skip them)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    ap.add_argument("--reps", type=int, default=7, help="timed, interleaved steps per library")
    ap.add_argument("--dead-fraction", type=float, nargs="+", default=[0.0, 0.25],
                    help="fractions of latents marked dead before every timed step "
                         "(0: no AuxK work; otherwise both libraries pay for AuxK)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of both libraries")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quality-tokens", type=int, default=524288,
                    help="training-token budget of the quality check (0: skip it)")
    ap.add_argument("--quality-batch", type=int, default=512)
    ap.add_argument("--quality-d-sae", type=int, default=4608)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")  # SAELens/transformers chatter

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; d_in={D_IN}, "
          f"k={K}, {args.tokens} tokens/step, {args.reps} interleaved reps (medians); with dead "
          f"latents both run AuxK with k_aux={D_IN // 2} (SAELens's fixed d_in / 2)")
    for d_sae in args.d_sae:
        for dead_fraction in args.dead_fraction:
            report_throughput(d_sae, dead_fraction, args)

    if args.quality_tokens > 0:
        q = quality(args.quality_d_sae, args.quality_tokens, args.quality_batch, args.lr)
        print(f"\n== quality: d_sae={args.quality_d_sae}, {q['steps']} steps x {q['batch']} "
              f"tokens = {q['tokens']} tokens, lr={args.lr}, structured synthetic data ==")
        print(f"  held-out explained variance (BatchTopK encoding): sae-sweep {q['ev_ours']:.3f}  "
              f"SAELens {q['ev_saelens']:.3f}")
        print(f"  sae-sweep inference encoding (calibrated threshold): "
              f"{q['ev_ours_inference']:.3f}; dead latents {q['dead_ours']:.1f}%")
        print(f"  wall time of the training runs: sae-sweep {q['t_ours_s']:.0f} s, "
              f"SAELens {q['t_saelens_s']:.0f} s")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
