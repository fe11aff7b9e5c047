"""The sweep driver: Ray Tune + Optuna over SAE hyperparameters, resumable after a lost driver.

``run_sweep(config)`` validates the config, reads the hook's width from the cache, checks the
corners of the search space against the trainer's configs, stores the resolved config in
``EXPERIMENT_DIR/sweep.json`` and runs a Tune ``Tuner``:

* search: :class:`~sweep.searcher.SweepSearcher` (Ray's OptunaSearch, NaN-safe) over the
  define-by-run :class:`~sweep.search_space.SearchSpace`; TPE by default (multi-objective TPE for
  a Pareto objective; NSGA-II or random on request), metric/mode lists on the searcher; the
  Optuna study persists in ``EXPERIMENT_DIR/optuna.db`` (or any Optuna storage URL) under
  ``study_name`` and is loaded if it exists;
* a ``ConcurrencyLimiter`` (without one TPE degenerates to random search), optional ASHA,
  ``FailureConfig(max_failures)`` (a lost worker or node resumes from the trial's checkpoint),
  the per-trial resources (fractional GPUs allowed) and the time budget;
* :class:`~sweep.results_callback.ResultsCallback` keeping ``results.parquet`` and
  ``history.parquet`` current.

``resume_sweep(experiment_dir)`` continues a sweep whose driver died: ``Tuner.restore`` keeps the
finished trials, resumes unfinished ones from their last checkpoint, starts the trials still
missing, and the Optuna study keeps its history; no trial runs twice.

Ray: local (``ray.init``, no dashboard, ``RAY_AUTH_MODE=disabled``) unless ``address`` names a
running cluster (``"auto"`` or ``HOST:PORT``); an already initialised Ray is used as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import pandas as pd

from activation_cache import ConfigError, UserError

from .console import configure_logging, elapsed
from .results import SWEEP_FILE, load_results, load_sweep_info
from .sweep_config import SweepConfig

logger = logging.getLogger("sweep")

TUNE_NAME = "tune"


class ExperimentExistsError(UserError, FileExistsError):
    """``run_sweep`` was pointed at an experiment folder that already holds a sweep."""


class NotAnExperimentError(UserError, FileNotFoundError):
    """``resume_sweep`` was pointed at a folder that holds no sweep."""


class RayConnectionError(UserError, ConnectionError):
    """``--address`` names no reachable Ray cluster."""


def run_sweep(config_path: str | Path | SweepConfig, *, address: Optional[str] = None,
              verbose: bool = False) -> pd.DataFrame:
    """Run the sweep described by ``config_path`` (YAML or a SweepConfig); return the results
    table. Refuses an experiment folder that already holds a sweep (resume it instead).

    The console shows a compact live view; Ray's own output goes to ``EXPERIMENT_DIR/sweep.log``
    unless ``verbose`` (see :mod:`sweep.console`)."""
    configure_logging()
    cfg = config_path if isinstance(config_path, SweepConfig) else SweepConfig.from_yaml(config_path)
    cfg = _absolute_paths(cfg)  # trials (on any node) and --resume (from any cwd) agree
    exp = cfg.experiment_path
    if (exp / SWEEP_FILE).exists():
        raise ExperimentExistsError(
            f"{exp} already holds a sweep; continue it with `sae-sweep sweep --resume {exp}` "
            "or set experiment_dir to a new folder")
    tune_path = _tune_path(cfg)
    if "://" not in tune_path and Path(tune_path).exists():
        # storage_path/<experiment folder name> is shared by experiments of the same name
        raise ExperimentExistsError(
            f"{tune_path} already holds Ray Tune state of another sweep (same experiment folder "
            "name under storage_path); give experiment_dir a new name")
    d_in = cache_width(cfg)
    from .trial_configs import check_space

    check_space(cfg, d_in)
    exp.mkdir(parents=True, exist_ok=True)
    info = {"config": cfg.to_dict(), "d_in": d_in, "tune_path": tune_path,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": str(config_path) if not isinstance(config_path, SweepConfig) else None}
    (exp / SWEEP_FILE).write_text(json.dumps(info, indent=2))
    return _run(cfg, d_in, info["tune_path"], restore=False, address=address, verbose=verbose)


def resume_sweep(experiment_dir: str | Path, *, address: Optional[str] = None,
                 verbose: bool = False) -> pd.DataFrame:
    """Continue the sweep in ``experiment_dir`` after its driver stopped; return the results."""
    configure_logging()
    exp = Path(experiment_dir).expanduser().resolve()
    info = load_sweep_info(exp)
    if not info:
        raise NotAnExperimentError(f"{exp}: no {SWEEP_FILE}; not a sweep's experiment folder")
    cfg = SweepConfig.from_dict(info["config"]).replace(experiment_dir=str(exp))
    tune_path = info["tune_path"] if cfg.storage_path else str(exp / TUNE_NAME)
    return _run(cfg, int(info["d_in"]), tune_path, restore=True, address=address,
                verbose=verbose)


def cache_width(cfg: SweepConfig) -> int:
    """The hook's activation width, read from the cache (a clear error if it is not there)."""
    from activation_cache import open_cache

    try:
        cache = open_cache(cfg.cache)
    except UserError as exc:
        raise ConfigError(f"SweepConfig.cache: {exc} (build it first with `sae-sweep cache "
                          "CACHE.yaml`)") from None
    if "val" not in cache.manifest["splits"]:
        raise ConfigError(f"SweepConfig.cache: {cfg.cache} has no validation split (built with "
                          "val_fraction 0, or from a single document); trials are evaluated and "
                          "ranked on held-out windows: rebuild it with val_fraction > 0")
    if cfg.training.get("use_end_to_end") and cache.manifest.get("logits") is None:
        # refused here, once, rather than paying a second (clean) model pass per batch in
        # every trial
        raise ConfigError(f"SweepConfig.cache: {cfg.cache} stores no clean logits, which an "
                          "end-to-end sweep (training.use_end_to_end) takes its clean "
                          "distribution from; rebuild it with store_logits: true (see "
                          "examples/cache_e2e.yaml)")
    try:
        return int(cache.d_in(cfg.hook))
    except (KeyError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise ConfigError(f"SweepConfig.hook: {cfg.hook!r} is not stored in cache {cfg.cache} "
                          f"({exc})") from None


# -- the Tune run ------------------------------------------------------------------------------


def _run(cfg: SweepConfig, d_in: int, tune_path: str, *, restore: bool,
         address: Optional[str], verbose: bool = False) -> pd.DataFrame:
    from ray import tune

    from .console import ConsoleSettings, sweep_output
    from .live_view import ConsoleCallback
    from .results_callback import ResultsCallback
    from .trainable import train_trial

    # An intermediate report may lack an objective metric (a two-phase trial reports
    # ce_loss_delta only from its fine-tune on); the searcher reads the final report, which the
    # trial's reporter guarantees carries every objective metric, and ASHA skips reports
    # without its metric. Ray's strict check would otherwise end the sweep at the first one.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    job = {"config": cfg.to_dict(), "d_in": d_in}
    trainable = with_trial_resources(tune.with_parameters(train_trial, job=job), cfg)
    callbacks = [ResultsCallback(cfg.experiment_path),
                 ConsoleCallback(ConsoleSettings.from_sweep(cfg, resumed=restore))]
    started = time.monotonic()
    with sweep_output(cfg.experiment_path, verbose=verbose) as out, \
            ray_session(address, on_start=out.capture_worker_output):
        if restore:
            if not tune.Tuner.can_restore(tune_path):
                raise NotAnExperimentError(
                    f"{cfg.experiment_path}: no Ray Tune state at {tune_path} to resume (the "
                    "driver stopped before the first trial started?); start it again with "
                    "`sae-sweep sweep CONFIG` and a new experiment_dir")
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
            # the restored RunConfig is the first run's: this run's console and callbacks
            _update_run_config(tuner, callbacks=callbacks, verbose=out.tune_verbose,
                               progress_reporter=out.progress_reporter())
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=_tune_config(cfg, d_in),
                run_config=tune.RunConfig(
                    name=Path(tune_path).name,
                    storage_path=str(Path(tune_path).parent) if "://" not in tune_path
                    else tune_path.rsplit("/", 1)[0],
                    failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
                    callbacks=callbacks,
                    verbose=out.tune_verbose,
                    progress_reporter=out.progress_reporter(),
                ),
            )
        logger.info("%s sweep %s: %d trials, %d at a time, %s; Ray's log: %s",
                    "resuming" if restore else "starting", cfg.experiment_path.name,
                    cfg.num_samples, cfg.max_concurrent_trials, _objective_text(cfg),
                    out.log_path)
        with out.tune_run():
            tuner.fit()
    results = load_results(cfg.experiment_path)
    counts = results["status"].value_counts().to_dict()
    logger.info("sweep %s finished in %s: %s", cfg.experiment_path.name,
                elapsed(time.monotonic() - started),
                ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return results


def with_trial_resources(trainable: Any, cfg: SweepConfig) -> Any:
    """``trainable`` reserving ``resources_per_trial`` for each trial: Ray starts a trial only
    where its CPUs, GPUs (fractions share a GPU: 0.25 packs four trials on one) and custom
    resources are free, and assigns them to it (see ``trainable.configure_trial_resources``)."""
    from ray import tune

    return tune.with_resources(trainable, cfg.resources_per_trial.as_tune_resources())


def _objective_text(cfg: SweepConfig) -> str:
    objective = cfg.objective
    text = ", ".join(f"{'minimise' if mode == 'min' else 'maximise'} {metric}"
                     for metric, mode in zip(objective.metrics, objective.modes))
    bounds = [c.as_query().replace("`", "") for c in objective.constraints]
    return text + (f" subject to {' and '.join(bounds)}" if bounds else "")


def _update_run_config(tuner: Any, **changes: Any) -> None:
    """Set fields of a restored Tuner's RunConfig (Ray 2.60 keeps it on ``_local_tuner``;
    with another layout the restored settings stay)."""
    local = getattr(tuner, "_local_tuner", None)
    run_config = local.get_run_config() if local is not None else None
    if run_config is None:  # pragma: no cover - another Ray layout
        logger.debug("cannot update the restored RunConfig; keeping the first run's")
        return
    for name, value in changes.items():
        setattr(run_config, name, value)


def _tune_config(cfg: SweepConfig, d_in: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    searcher = make_searcher(cfg, d_in)
    scheduler = None
    if cfg.scheduler.type == "asha":
        metric, mode = cfg.scheduler_metric_mode()
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=metric, mode=mode,
                                  max_t=cfg.scheduler.max_t, grace_period=cfg.scheduler.grace_period,
                                  reduction_factor=cfg.scheduler.reduction_factor)
    return tune.TuneConfig(
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent_trials),
        scheduler=scheduler,
        num_samples=cfg.num_samples,
        time_budget_s=cfg.time_budget_s,
        reuse_actors=True,
    )


def make_searcher(cfg: SweepConfig, d_in: int) -> Any:
    """The NaN-safe OptunaSearch with the define-by-run space and a persistent study."""
    import optuna

    from .search_space import SearchSpace
    from .searcher import PicklableNSGAIISampler, SweepSearcher

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    constraints = list(cfg.objective.constraints)
    if cfg.sampler == "nsgaii":
        sampler = PicklableNSGAIISampler(seed=cfg.seed,
                                          population_size=max(4, cfg.max_concurrent_trials * 2))
    elif cfg.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials(),
                                             multivariate=True, group=True, constant_liar=True)
    cfg.experiment_path.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(cfg.optuna_storage_url())
    objective = cfg.objective
    return SweepSearcher(
        space=SearchSpace(cfg, d_in),
        metric=list(objective.metrics) if objective.is_pareto else objective.metrics[0],
        mode=list(objective.modes) if objective.is_pareto else objective.modes[0],
        sampler=sampler, study_name=cfg.study_name, storage=storage,
        constraints=constraints, record_dir=str(cfg.experiment_path),
    )


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, *, on_start: Any = None,
                **init_kwargs: Any) -> Iterator[None]:
    """Use the running Ray, or connect to ``address``, or start a local one; disconnect after
    (``ray.shutdown``, which stops every process of a local Ray it started). ``on_start`` is
    called after this function started or connected Ray (not for a Ray already running)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        yield
        return
    if address:  # an existing cluster: node options belong to `ray start`, not to us
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, SystemExit) as exc:  # Ray exits the process on a GCS timeout
            raise RayConnectionError(
                f"cannot connect to a Ray cluster at --address {address!r} ({exc}); start one "
                "(`ray start --head`, `ray up cluster.yaml`) or leave --address out to run on a "
                "local Ray") from None
    else:
        ray.init(include_dashboard=False, log_to_driver=True, **init_kwargs)
    try:
        if on_start is not None:
            on_start()
        yield
    finally:
        ray.shutdown()


def _absolute_paths(cfg: SweepConfig) -> SweepConfig:
    changes = {"experiment_dir": str(cfg.experiment_path)}
    if "://" not in cfg.cache:
        changes["cache"] = str(Path(cfg.cache).expanduser().resolve())
    if cfg.storage_path and "://" not in cfg.storage_path:
        changes["storage_path"] = str(Path(cfg.storage_path).expanduser().resolve())
    return cfg.replace(**changes)


def _tune_path(cfg: SweepConfig) -> str:
    if cfg.storage_path:
        return cfg.storage_path.rstrip("/") + "/" + cfg.experiment_path.name
    return str(cfg.experiment_path / TUNE_NAME)
