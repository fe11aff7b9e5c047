"""k-sparse training-step benchmark: sae-sweep vs SAELens (CPU, fp32). Prints figures.

    .venv/bin/python bench/train_step.py                  # everything (~10-20 min on 2 cores)
    .venv/bin/python bench/train_step.py --arch topk --d-sae 4608 --dead-fraction 0

For each architecture (``--arch``: batchtopk, topk, matryoshka_batchtopk), dictionary size and
dead fraction:

1. Throughput. One full training step of each library on the same random activations
   (d_in=576, k=32, 4096 tokens, fp32, 2 threads), interleaved repetitions, medians:
   * ours: the SAE built by ``trainer.build_sae(make_sae_config(architecture=...))``, then
     ``LocalObjective.step`` (the architecture's training forward + AuxK), backward,
     decoder-gradient projection, clipping, Adam, renormalisation and
     ``update_training_state(out.fired, out.running, ...)`` (dead tracking and the threshold
     EMA) -- the same calls, in the same order, as ``trainer.train_sae``'s step;
   * SAELens: ``SAETrainer.step`` of the matching training SAE (``BatchTopKTrainingSAE``,
     ``TopKTrainingSAE``, ``MatryoshkaBatchTopKTrainingSAE`` with our prefix widths; SAELens's
     defaults otherwise): forward, AuxK, backward, clipping, Adam, scheduler.
   Both get the same dead latents before every step (``--dead-fraction``; with 0 neither
   runs AuxK), with the same k_aux (SAELens hard-codes d_in / 2; ours is set to match). A plain fp32
   matmul of the encoder's shape is timed in the same loop for the GFLOP/s comparison.
2. Where our step's time goes (per-phase medians) and what bounds the speed-up
   (``--no-phases`` skips it).

A summary table at the end has one row per (architecture, d_sae, dead fraction). Reconstruction
quality on real activations is bench/quality.py's job.

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
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402

from trainer import (LocalObjective, TokenBatch, TrainingConfig,  # noqa: E402
                     TrainingProgress, build_sae, field_catalog, make_sae_config, sparse_ops)
from trainer.sparse_ops import (  # noqa: E402
    auxk_reconstruct, batch_topk_indices, prefix_decodes, topk_per_token_forward,
    topk_sae_forward)
from trainer.training import make_optimizer  # noqa: E402

D_IN, K = 576, 32
ARCHS = ("batchtopk", "topk", "matryoshka_batchtopk")


# --------------------------------------------------------------------------------------------
# The two training steps
# --------------------------------------------------------------------------------------------


class OurStep:
    """One sae-sweep training step of architecture ``arch``, as ``trainer.train_sae`` runs it
    (``autocast``: the forward under bf16 autocast on ``device``)."""

    name = "sae-sweep"

    def __init__(self, arch: str, d_sae: int, k_aux: int, lr: float, seed: int = 0, *,
                 d_in: int = D_IN, k: int = K, device: str = "cpu", autocast: bool = False):
        self.arch = arch
        # the threshold EMA (where the architecture has one) runs from the first step
        own = field_catalog().owned[arch]
        extra = {"threshold_warmup_steps": 0} if "threshold_warmup_steps" in own else {}
        self.cfg = make_sae_config(d_in=d_in, d_sae=d_sae, architecture=arch, top_k=k,
                                   top_k_aux=k_aux, n_batches_to_dead=1000, device=device,
                                   **extra)
        self.steps = 0
        self.autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
                         if autocast else contextlib.nullcontext())
        self.sae = build_sae(self.cfg, seed=seed)
        self.config = TrainingConfig(lr=lr, outlier_policy="none")
        self.objective = LocalObjective(self.config)
        self.params = [p for p in self.sae.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.sae, self.config, lr)
        self.sae.train()

    @property
    def prefix_widths(self) -> Optional[tuple[int, ...]]:
        """Matryoshka's cumulative prefix widths (our default group_fractions); else None."""
        if self.arch != "matryoshka_batchtopk":
            return None
        return self.cfg.options.prefix_widths(self.cfg.d_sae)

    def set_dead(self, dead: torch.Tensor) -> None:
        counts = self.sae.num_batches_not_active
        counts.zero_()
        counts[dead] = self.cfg.n_batches_to_dead

    def step(self, x: torch.Tensor, timer: Callable[[str], None] | None = None) -> None:
        tick = timer or (lambda name: None)
        sae = self.sae
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            out = self.objective.step(sae, TokenBatch.of(x))
        if not bool(torch.isfinite(out.loss)):
            raise RuntimeError("the loss diverged")
        tick("forward (objective.step)")
        out.loss.backward()
        tick("backward")
        sae.project_decoder_gradients()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        tick("gradient projection + clipping")
        self.opt.step()
        tick("Adam step")
        sae.normalize_decoder()
        self.steps += 1
        sae.update_training_state(out.fired, out.running,
                                  TrainingProgress(self.steps, 10**9))
        tick("renormalisation + dead tracking + running statistics")


def saelens_training_sae(arch: str, d_sae: int, prefix_widths: Optional[tuple[int, ...]], *,
                         d_in: int = D_IN, k: int = K, device: str = "cpu"):
    """SAELens's training SAE matching ``arch`` (its defaults, k=K; Matryoshka: our widths)."""
    common = dict(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device=device)
    if arch == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    if arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        return TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    if arch == "matryoshka_batchtopk":
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig)

        assert prefix_widths is not None
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=list(prefix_widths),
                                                   **common)
        return MatryoshkaBatchTopKTrainingSAE(cfg)
    raise ValueError(f"no SAELens counterpart for {arch!r}")


class SaeLensStep:
    """One SAELens ``SAETrainer.step`` of the training SAE matching ``arch``."""

    name = "SAELens"

    def __init__(self, arch: str, d_sae: int, lr: float,
                 prefix_widths: Optional[tuple[int, ...]] = None, total_steps: int = 10**6,
                 batch: int = 4096, *, d_in: int = D_IN, k: int = K, device: str = "cpu",
                 autocast: bool = False):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.sae = saelens_training_sae(arch, d_sae, prefix_widths, d_in=d_in, k=k,
                                        device=device)
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
# Our kernels, timed alone (the "parts" of the phase breakdown and the executed-work count)
# --------------------------------------------------------------------------------------------


def selection(arch: str, pre: torch.Tensor) -> torch.Tensor:
    """The training encoding's exact selection on pre-activations [N, d_sae]: the latent index
    of every selected (token, latent) pair (positive values only)."""
    if arch == "topk":
        top = pre.topk(K, dim=1, sorted=False)
        return top.indices[top.values > 0]
    return batch_topk_indices(pre, K * pre.shape[0]) % pre.shape[1]


def kernel_loss(ours: OurStep, xs: torch.Tensor):
    """The training encoding and reconstruction loss of scaled tokens (no AuxK): our sparse
    kernels, as the architecture's ``training_forward`` calls them. ``(TopKForward, loss)``."""
    sae = ours.sae
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    if ours.arch == "topk":
        out = topk_per_token_forward(xs, *params, K)
    else:
        out = topk_sae_forward(xs, *params, K)
    widths = ours.prefix_widths
    if widths is None:
        return out, (out.x_hat - xs).pow(2).mean()
    recons = prefix_decodes(out, sae.W_dec, sae.b_dec, widths)
    return out, torch.stack([(r - xs).pow(2).mean() for r in recons]).mean()


def executed_flop(ours: OurStep, x: torch.Tensor, dead: torch.Tensor) -> tuple[float, float]:
    """(FLOP our step executes, FLOP of the dense encoder GEMM) on batch ``x``: the GEMM, four
    sparse passes of 2*M*d_in over the M selected pairs (decode, dv, dW_dec, dW_enc),
    Matryoshka's three more over the pairs of its inner prefixes (decode, dv, dW_dec), and AuxK
    (four GEMMs over the dead columns, or four sparse passes over its pairs when those are
    few)."""
    n, d_sae = x.shape[0], ours.cfg.d_sae
    with torch.no_grad():
        latents = selection(ours.arch, ours.sae.pre_activations(ours.sae.scale_input(x)))
    pairs = latents.numel()
    widths = ours.prefix_widths
    inner = int((latents < widths[-2]).sum()) if widths and len(widths) > 1 else 0
    gemm = 2.0 * n * D_IN * d_sae
    n_dead = int(dead.sum())
    k_aux = min(int(ours.cfg.top_k_aux), n_dead)
    if n_dead and k_aux / n_dead >= sparse_ops._AUXK_DENSE_DENSITY:
        aux = 4 * 2.0 * n * n_dead * D_IN
    else:
        aux = 4 * 2.0 * n * k_aux * D_IN
    return gemm + 4 * 2.0 * pairs * D_IN + 3 * 2.0 * inner * D_IN + aux, gemm


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def throughput(arch: str, d_sae: int, n_tok: int, reps: int, dead_fraction: float,
               lr: float) -> dict:
    gen = torch.Generator().manual_seed(d_sae)
    batches = [torch.randn(n_tok, D_IN, generator=gen) * 2.0 + 0.3 for _ in range(2)]
    dead = torch.rand(d_sae, generator=gen) < dead_fraction
    ours = OurStep(arch, d_sae, k_aux=D_IN // 2, lr=lr)
    theirs = SaeLensStep(arch, d_sae, lr=lr, prefix_widths=ours.prefix_widths)
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
    ours_flop, gemm_flop = executed_flop(ours, batches[0], dead)
    return {
        "arch": arch, "d_sae": d_sae, "dead": int(dead.sum()), "dead_fraction": dead_fraction,
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
    the same loop, its parts: the dense encoder GEMM, the exact selection, the architecture's
    kernel (training encoding + reconstruction loss, forward + backward) and the AuxK term
    (forward + backward)."""
    d_sae = ours.cfg.d_sae
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_tok, D_IN, generator=gen) * 2.0 + 0.3
    dead = torch.rand(d_sae, generator=gen) < dead_fraction
    phases: dict[str, list[float]] = {}
    sae = ours.sae
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    select_name = "per-token" if ours.arch == "topk" else "batch"

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
            selection(ours.arch, pre)
            parts["encoder GEMM (dense)"] = t1 - t0
            parts[f"exact {select_name} top-k selection"] = time.perf_counter() - t1
        t0 = time.perf_counter()
        out, loss = kernel_loss(ours, xs)
        loss.backward()
        parts[f"{ours.arch} kernel, forward + backward"] = time.perf_counter() - t0
        residual = (xs - out.x_hat).detach()
        t0 = time.perf_counter()
        aux = auxk_reconstruct(xs, *params, out.pre_acts, dead, int(ours.cfg.top_k_aux))
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


def report_throughput(arch: str, d_sae: int, dead_fraction: float,
                      args: argparse.Namespace) -> dict:
    r = throughput(arch, d_sae, args.tokens, args.reps, dead_fraction, args.lr)
    widths = r["ours"].prefix_widths
    extra = f", prefix widths {list(widths)} for both" if widths else ""
    print(f"\n== {arch}, d_sae={d_sae}, {r['dead']} dead latents ({dead_fraction:.0%}){extra} ==")
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
    if args.phases:
        phases = phase_breakdown(r["ours"], args.tokens, args.reps, dead_fraction)
        total = phases["total step"]
        print("  our step, per phase (medians of a separate interleaved run; parts timed alone):")
        for name, ms in phases.items():
            print(f"    {name:54s} {ms:7.1f} ms  {100 * ms / total:5.1f}%")
        gemm = phases["  part: encoder GEMM (dense)"]
        print(f"  bound: the dense encoder GEMM alone is {100 * gemm / total:.0f}% of our step; "
              f"a step that did nothing else would be {r['t_saelens_ms'] / gemm:.1f}x SAELens "
              f"(measured {r['ratio']:.1f}x)")
    del r["ours"]
    return r


def print_summary(rows: list[dict]) -> None:
    print("\n== summary (one row per architecture, d_sae, dead fraction) ==")
    print("| architecture | d_sae | dead | ours tok/s | SAELens tok/s | ratio | CPU-time ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['d_sae']} | {r['dead_fraction']:.0%} | "
              f"{r['tok_s_ours']:,.0f} | {r['tok_s_saelens']:,.0f} | {r['ratio']:.2f}x | "
              f"{r['cpu_ratio']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS),
                    help="architectures to compare with SAELens's (default: all three)")
    ap.add_argument("--d-sae", type=int, nargs="+", default=[4608, 9216],
                    help="dictionary sizes")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    ap.add_argument("--reps", type=int, default=7, help="timed, interleaved steps per library")
    ap.add_argument("--dead-fraction", type=float, nargs="+", default=[0.0, 0.25],
                    help="fractions of latents marked dead before every timed step "
                         "(0: no AuxK work; otherwise both libraries pay for AuxK)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of both libraries")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-phases", dest="phases", action="store_false",
                    help="skip the per-phase breakdown of our step (about halves the run time)")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    bad = [f for f in args.dead_fraction if not 0.0 <= f < 1.0]
    if bad:
        ap.error(f"--dead-fraction must be in [0, 1), got {bad}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")  # SAELens/transformers chatter

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; d_in={D_IN}, "
          f"k={K}, {args.tokens} tokens/step, {args.reps} interleaved reps (medians); with dead "
          f"latents both run AuxK with k_aux={D_IN // 2} (SAELens's fixed d_in / 2)")
    started = time.perf_counter()
    rows = [report_throughput(arch, d_sae, dead_fraction, args)
            for arch in args.arch for d_sae in args.d_sae for dead_fraction in args.dead_fraction]
    print_summary(rows)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; "
          f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
