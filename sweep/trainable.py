"""The Ray Tune trial: train one SAE with the trainer on the shared cache, reporting to Tune.

:func:`train_trial` runs inside a Ray worker. It builds the trial's SAEConfig/TrainingConfig from
the sampled parameters, opens the sweep's cache (local path or pyarrow URI; every trial on every
node reads the same one), resumes from ``ray.tune.get_checkpoint()`` when Tune restarts it (after
a lost worker, a lost node or a driver restart) and trains with ``trainer.train_sae``.

:class:`RayReporter` is the trainer's ``Reporter`` inside a sweep -- the one logging seam: every
MetricsRecord becomes one ``ray.tune.report(metrics, checkpoint=...)`` carrying the checkpoint
the trainer wrote at that step, so Tune always holds the newest resumable state.

Resources: a trial reserves ``resources_per_trial`` (CPUs, GPUs -- fractions pack several trials
on one GPU, e.g. 0.25 for four -- and custom resources). :func:`configure_trial_resources` sets
torch's intra-op threads to the CPUs Ray assigned to the trial (at least 1), and makes the trial
see only its device: Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPU it assigned (the same GPU for
the trials that share it), so ``device: auto`` or ``cuda`` is that GPU; a trial that reserved no
GPU gets an empty ``CUDA_VISIBLE_DEVICES`` (Ray leaves the variable alone then), so it cannot
silently use a GPU that other trials reserved (``auto`` becomes the CPU, ``cuda`` a clear error).

A diverged trial (the trainer's NaN/inf loss, or a non-finite objective metric) ends with one
last report that carries ``error`` (the reason) and NaN objective values, and then returns: the
results table records it as ``failed`` with that reason, the searcher tells Optuna FAIL (never
the NaN), and Tune does not retry it (its retries are for lost processes and nodes; re-training
from the last checkpoint would only reach the same NaN). The sweep goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from activation_cache import UserError

from .sweep_config import RENAMED_METRICS, catalog

logger = logging.getLogger("sweep.trial")

PROGRESS_FILE = "sweep_progress.json"


class TrialDiverged(UserError, RuntimeError):
    """The trial's loss or an objective metric became NaN/inf; it is not retried."""


class MissingMetricError(UserError, RuntimeError):
    """The training run does not compute a metric the sweep's objective needs."""


class RayReporter:
    """``trainer.Reporter`` that reports every MetricsRecord (and checkpoint) to Ray Tune.

    ``monitored`` are the objective/constraint metrics: each report must carry a finite value
    of every one of them (a NaN means divergence; a missing one a misconfigured sweep)."""

    def __init__(self, *, monitored: tuple[str, ...], max_tokens: Optional[int] = None,
                 node_id: str = "", node_ip: str = "", report_fn: Any = None):
        self.monitored = monitored
        self.max_tokens = max_tokens
        self.time_offset = 0.0
        self.node_id = node_id
        self.node_ip = node_ip
        self.total_steps: Optional[int] = None
        self.reported_final = False
        self.last_metrics: dict[str, Any] = {}
        self._report = report_fn or _ray_report

    # -- trainer.Reporter -----------------------------------------------------------------
    def on_train_start(self, *, total_steps: int, start_step: int, description: str) -> None:
        self.total_steps = total_steps
        logger.info("%s: steps %d -> %d", description, start_step, total_steps)

    def on_step(self, step: int) -> None:
        pass

    def on_metrics(self, record: Any, checkpoint_dir: Optional[str]) -> None:
        final = ((self.total_steps is not None and record.step >= self.total_steps)
                 or (self.max_tokens is not None and record.tokens_seen >= self.max_tokens))
        metrics = record_to_metrics(record)
        if "train_seconds" in metrics:
            metrics["train_seconds"] += self.time_offset
        self.report(metrics, checkpoint_dir, final=final)

    def time_columns(self) -> dict[str, float]:
        """Where the trial's wall time went so far (``time_<phase>_s``, ``time_wall_s``):
        the active ``trainer.PhaseTimer``'s columns, {} when none is active."""
        from trainer import active_timer

        timer = active_timer()
        return timer.columns() if timer is not None else {}

    def on_message(self, text: str) -> None:
        logger.info("%s", text)

    def on_train_end(self, result: Any) -> None:
        pass

    def report_failure(self, reason: str) -> None:
        """The last report of a diverged trial: the reason, NaN objective values (the searcher
        tells Optuna FAIL for them), no checkpoint."""
        metrics = {name: float("nan") for name in self.monitored}
        metrics.update(step=self.last_metrics.get("step"),
                       tokens_seen=self.last_metrics.get("tokens_seen"),
                       error=reason, final=False, node_id=self.node_id, node_ip=self.node_ip)
        self._report(metrics, None)

    # -- reporting --------------------------------------------------------------------------
    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str], *,
               final: bool) -> None:
        for name in self.monitored:
            value = metrics.get(name)
            if value is None and not final:
                continue  # e.g. ce_loss_delta before a two-phase trial's fine-tune starts
            if value is None:
                raise MissingMetricError(
                    f"the sweep's objective needs metric {name!r}, but this training run does "
                    f"not compute it at step {metrics.get('step')} (end-to-end metrics such as "
                    "ce_loss_delta or kl_div need training.use_end_to_end and a cache with "
                    "clean logits)")
            if not math.isfinite(float(value)):
                raise TrialDiverged(
                    f"diverged: {name} is {value} at step {metrics.get('step')} "
                    f"(tokens {metrics.get('tokens_seen')}); lower lr or check the data")
        metrics = dict(metrics, final=bool(final), node_id=self.node_id, node_ip=self.node_ip)
        times = self.time_columns()
        metrics.update(times)
        if checkpoint_dir and metrics.get("train_seconds") is not None:
            # lets a restarted attempt continue the clocks (see _elapsed_at, _times_at)
            (Path(checkpoint_dir) / PROGRESS_FILE).write_text(
                json.dumps({"train_seconds": metrics["train_seconds"], "times": times}))
        self.last_metrics = metrics
        self.reported_final = self.reported_final or bool(final)
        self._report(metrics, checkpoint_dir)


def record_to_metrics(record: Any) -> dict[str, Any]:
    """A MetricsRecord as flat numbers for Tune (and the results tables).

    ``lr`` becomes ``lr_current`` (so it cannot clash with the ``lr`` hyperparameter),
    ``elapsed_s`` becomes ``train_seconds``; ``l0`` is the shipped encoder's (the record's own
    field)."""
    metrics: dict[str, Any] = dict(record.scalars())
    for name, reported_as in RENAMED_METRICS.items():
        if name in metrics:
            metrics[reported_as] = metrics.pop(name)
    return metrics


def _ray_report(metrics: dict[str, Any], checkpoint_dir: Optional[str]) -> None:
    from ray import tune

    checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    tune.report(metrics, checkpoint=checkpoint)


def train_trial(params: Mapping[str, Any], *, job: Mapping[str, Any]) -> None:
    """Ray Tune function trainable: ``params`` are the sampled hyperparameters, ``job`` the
    sweep (``{"config": SweepConfig dict, "d_in": int}``) bound with ``tune.with_parameters``.

    Where its wall time goes is timed (``trainer.PhaseTimer``, active for the whole trial) and
    every report carries it as ``time_<phase>_s`` columns and ``time_wall_s``."""
    started = time.perf_counter()
    from trainer import PhaseTimer

    timer = PhaseTimer(started=started)  # the import above counts as start-up
    timer.add("startup", time.perf_counter() - started)
    with timer.activate():
        _run_trial(params, job, timer)


def _run_trial(params: Mapping[str, Any], job: Mapping[str, Any], timer: Any) -> None:
    import ray
    from ray import tune

    from activation_cache import open_cache

    from .sweep_config import SweepConfig
    from .trial_configs import build_trial_configs

    with timer.phase("startup"):
        cfg = SweepConfig.from_dict(job["config"])
        d_in = job["d_in"]
        if cfg.is_suite:  # this trial's hook is searched as a one-hook sweep (sweep/suite.py)
            from .suite import HOOK_KEY, hook_config

            hook = params[HOOK_KEY]
            cfg, d_in = hook_config(cfg, hook), job["d_in_by_hook"][hook]
            params = {k: v for k, v in params.items() if k != HOOK_KEY}
        configure_trial_resources(cfg.resources_per_trial)

        cache = open_cache(cfg.cache)
        d_out = None if cfg.hook_out is None else int(cache.d_in(cfg.hook_out))
        sae_cfg, train_cfg = build_trial_configs(cfg, params, d_in, d_out)
        objective, train_source, val_source, test_source, evaluators = _sources(cache, sae_cfg,
                                                                                train_cfg)

    ctx = ray.get_runtime_context()
    reporter = RayReporter(monitored=cfg.objective.monitored_metrics(),
                           max_tokens=train_cfg.max_tokens, node_id=ctx.get_node_id(),
                           node_ip=ray.util.get_node_ip_address())
    # The trainer's own folder is scratch space outside the trial folder (whose files Tune
    # syncs as artifacts): Tune holds the state in the checkpoints it is handed.
    work = Path(tempfile.mkdtemp(prefix=f"sae-sweep-{tune.get_context().get_trial_id()}-"))
    checkpoint = tune.get_checkpoint()
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        resume_dir = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        if resume_dir is not None:
            reporter.time_offset = _elapsed_at(resume_dir)
            timer.restore(_times_at(resume_dir))
        try:
            result = _train(sae_cfg, train_cfg, train_source, val_source, objective,
                            out_dir=work, resume_dir=resume_dir, reporter=reporter,
                            evaluators=evaluators)
        except Exception as exc:
            if not _is_divergence(exc):
                raise
            reason = str(exc) if isinstance(exc, TrialDiverged) else f"diverged: {exc}"
            reporter.report_failure(f"{type(exc).__name__}: {reason}")
            return
        if not reporter.reported_final:
            _report_final(reporter, result, resume_dir)
        if test_source is not None:
            _report_test(reporter, result, train_cfg, test_source, objective, evaluators)


def _report_test(reporter: RayReporter, result: Any, train_cfg: Any, test_source: Any,
                 objective: Any, evaluators: Any = None) -> None:
    """One last report: the final (val) metrics again, plus the shipped SAE's figures on the
    held-out test split as ``test_<metric>`` (what ``best`` shows and the card reports;
    nothing selects on them). The searcher still reads the val objective from it."""
    from trainer import evaluate_split

    record = evaluate_split(result.sae, test_source, train_cfg, split="test", objective=objective,
                            evaluators=evaluators)
    metrics = dict(reporter.last_metrics)
    for key in ("final", "node_id", "node_ip"):
        metrics.pop(key, None)
    figures = set(catalog().evaluation_metrics)  # not the training run's counters or state
    metrics.update({f"test_{k}": v for k, v in record.scalars().items() if k in figures})
    reporter.report(metrics, None, final=True)


def configure_trial_resources(resources: Any, assigned: Optional[Mapping[str, float]] = None
                              ) -> dict[str, Any]:
    """Set up this trial's process for its resources; return what it got.

    ``resources`` is the sweep's ``resources_per_trial``; ``assigned`` what Ray assigned to this
    worker (default: ``ray.get_runtime_context().get_assigned_resources()``, empty outside Ray).
    Torch's intra-op threads become the assigned CPUs (else ``resources.cpu``), at least 1.
    Without an assigned GPU, ``CUDA_VISIBLE_DEVICES`` is emptied (before CUDA starts) so the
    trial cannot use a GPU it did not reserve. Returns ``{"cpus", "gpus", "threads", "assigned",
    "cuda_visible_devices"}``.
    """
    import torch

    if assigned is None:
        assigned = _assigned_resources()
    cpus = float(assigned.get("CPU", resources.cpu))
    gpus = float(assigned.get("GPU", 0.0))
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    if gpus == 0 and assigned:
        if torch.cuda.is_initialized():  # pragma: no cover - a reused process that used CUDA
            logger.warning("trial reserved no GPU, but CUDA is already initialised here")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
    got = {"cpus": cpus, "gpus": gpus, "threads": threads, "assigned": dict(assigned),
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    logger.info("trial resources: %g CPU (torch threads %d), %g GPU (CUDA_VISIBLE_DEVICES=%s)",
                cpus, threads, gpus, got["cuda_visible_devices"])
    return got


def _assigned_resources() -> dict[str, float]:
    """The resources Ray assigned to this worker (CPU, GPU, custom), {} outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return {}
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return {}
    return {k: float(v) for k, v in ctx.get_assigned_resources().items()}


def _elapsed_at(checkpoint_dir: str) -> float:
    """Training seconds already spent when ``checkpoint_dir`` was reported (the reporter stores
    them in it), so ``train_seconds`` counts across restarts as if the trial never stopped."""
    try:
        return float(json.loads((Path(checkpoint_dir) / PROGRESS_FILE).read_text())["train_seconds"])
    except (OSError, ValueError, TypeError, KeyError):
        return 0.0


def _times_at(checkpoint_dir: str) -> dict[str, float]:
    """The time columns stored with ``checkpoint_dir`` ({} when absent): a restarted attempt
    adds its own time to them."""
    try:
        times = json.loads((Path(checkpoint_dir) / PROGRESS_FILE).read_text()).get("times")
    except (OSError, ValueError, TypeError, AttributeError):
        return {}
    return times if isinstance(times, dict) else {}


def _train(sae_cfg: Any, train_cfg: Any, train_source: Any, val_source: Any, objective: Any, *,
           out_dir: Path, resume_dir: Optional[str], reporter: RayReporter,
           evaluators: Any = None) -> Any:
    from trainer import build_sae, timed_phase, train_sae

    with timed_phase("startup"):
        sae = build_sae(sae_cfg, seed=train_cfg.seed)  # seeded initial weights: reproducible trials
    return train_sae(sae, train_source, train_cfg, val_source=val_source, out_dir=str(out_dir),
                     resume_from=resume_dir, reporter=reporter, objective=objective,
                     evaluators=evaluators)


def _report_final(reporter: RayReporter, result: Any, resume_dir: Optional[str]) -> None:
    """Report the final state flagged ``final`` when the trainer's last record was not (e.g. a
    trial restarted from its already-final checkpoint, where the trainer has nothing to do)."""
    record = getattr(result, "final", None)
    metrics = record_to_metrics(record) if record is not None else dict(reporter.last_metrics)
    for key in ("final", "node_id", "node_ip"):
        metrics.pop(key, None)
    if reporter.time_offset:  # the clock stored with the checkpoint we restarted from
        metrics["train_seconds"] = max(float(metrics.get("train_seconds") or 0.0),
                                       reporter.time_offset)
    checkpoint_dir = getattr(result, "last_checkpoint", None) or resume_dir
    reporter.report(metrics, str(checkpoint_dir) if checkpoint_dir else None, final=True)


def _sources(cache: Any, sae_cfg: Any, train_cfg: Any) -> tuple[Any, Any, Any, Any, Any]:
    """``(objective, train_source, val_source, test_source, evaluators)`` on the shared cache, as
    ``trainer.job_sources`` builds them for this SAE (its input and output hooks) and training
    config (local, end-to-end on the cache's identity-checked model, or the two-phase
    fine-tune). ``test_source`` is None when the cache has no test split (built before they
    existed)."""
    from trainer import job_sources

    s = job_sources(cache, train_cfg, sae_cfg.hook_spec, target_hook=sae_cfg.hook_spec_out,
                    device=sae_cfg.torch_device())
    return s.objective, s.train, s.val, s.test, s.evaluators


def _is_divergence(exc: BaseException) -> bool:
    if isinstance(exc, TrialDiverged):
        return True
    try:
        from trainer import TrainingDivergedError  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, TrainingDivergedError)
