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

With ``confirm`` set, a second stage follows the search in the same run: the best
configurations re-trained with new seeds, as their own Tune run(s) (:mod:`sweep.confirm`).

``resume_sweep(experiment_dir)`` continues a sweep whose driver died: ``Tuner.restore`` keeps the
finished trials, resumes unfinished ones from their last checkpoint, starts the trials still
missing, and the Optuna study keeps its history; no trial runs twice.

One live driver per experiment (:mod:`sweep.driver_lock`): both take the experiment's lock
before anything else touches the folder, refuse (one line naming the running driver) when
another driver holds it, and take over, saying so, a lock its killed driver left behind.

Every ending says what happened: a finished sweep logs its counts (and one warning line per
architecture that never met the constraints); a sweep stopped with Ctrl-C marks the unfinished
trials ``interrupted``, logs "interrupted" with the exact ``--resume`` command and raises
:class:`SweepInterrupted` (a KeyboardInterrupt) once everything is saved.

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

from .console import configure_logging, display_path, elapsed
from .driver_lock import driver_lock
from .results import SWEEP_FILE, ResultsNotFoundError, load_results, load_sweep_info
from .sweep_config import SweepConfig

logger = logging.getLogger("sweep")

TUNE_NAME = "tune"


class ExperimentExistsError(UserError, FileExistsError):
    """``run_sweep`` was pointed at an experiment folder that already holds a sweep."""


class NotAnExperimentError(UserError, FileNotFoundError):
    """``resume_sweep`` was pointed at a folder that holds no sweep."""


class RayConnectionError(UserError, ConnectionError):
    """``--address`` names no reachable Ray cluster."""


class StorageError(UserError, RuntimeError):
    """The Optuna storage cannot be opened or written."""


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped with Ctrl-C (SIGINT) after saving everything; ``resume_command``
    continues it."""

    def __init__(self, experiment_dir: Path, resume_command: str):
        super().__init__(f"continue it with: {resume_command}")
        self.experiment_dir = experiment_dir
        self.resume_command = resume_command


def resume_command(experiment_dir: str | Path, address: Optional[str] = None) -> str:
    """The exact command that continues the sweep in ``experiment_dir``."""
    cmd = f"sae-sweep sweep --resume {display_path(experiment_dir)}"
    return cmd + (f" --address {address}" if address else "")


def run_sweep(config_path: str | Path | SweepConfig, *, address: Optional[str] = None,
              verbose: bool = False, take_over: bool = False) -> pd.DataFrame:
    """Run the sweep described by ``config_path`` (YAML or a SweepConfig); return the results
    table. Refuses an experiment folder that already holds a sweep (resume it instead) or that
    another live driver holds (``take_over``: replace the lock of a driver on another host).

    The console shows a compact live view; Ray's own output goes to ``EXPERIMENT_DIR/sweep.log``
    unless ``verbose`` (see :mod:`sweep.console`). Ctrl-C raises :class:`SweepInterrupted`
    after the sweep's state is saved."""
    configure_logging()
    cfg = config_path if isinstance(config_path, SweepConfig) else SweepConfig.from_yaml(config_path)
    cfg = _absolute_paths(cfg)  # trials (on any node) and --resume (from any cwd) agree
    exp = cfg.experiment_path
    with driver_lock(exp, take_over=take_over) as lock:  # before anything touches the folder
        if (exp / SWEEP_FILE).exists():
            raise ExperimentExistsError(
                f"{exp} already holds a sweep; continue it with `{resume_command(exp, address)}` "
                "or set experiment_dir to a new folder")
        tune_path = _tune_path(cfg)
        if "://" not in tune_path and Path(tune_path).exists():
            # storage_path/<experiment folder name> is shared by experiments of the same name
            raise ExperimentExistsError(
                f"{tune_path} already holds Ray Tune state of another sweep (same experiment "
                "folder name under storage_path); give experiment_dir a new name")
        from .trial_configs import check_space

        widths = None
        if cfg.is_suite:  # several hooks, one search each (sweep/suite.py)
            from .suite import hook_config, resolve_hooks, suite_widths

            cfg = resolve_hooks(cfg)
            widths = suite_widths(cfg, cache_width)
            for hook, width in widths.items():
                check_space(hook_config(cfg, hook), width)
            d_in = next(iter(widths.values()))
        else:
            d_in = cache_width(cfg)
            check_space(cfg, d_in)
        lock.announce()
        info = {"config": cfg.to_dict(), "d_in": d_in, "d_in_by_hook": widths,
                "tune_path": tune_path,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "source": str(config_path) if not isinstance(config_path, SweepConfig) else None}
        (exp / SWEEP_FILE).write_text(json.dumps(info, indent=2))
        return _run(cfg, d_in, info["tune_path"], restore=False, address=address,
                    verbose=verbose, widths=widths)


def resume_sweep(experiment_dir: str | Path, *, address: Optional[str] = None,
                 verbose: bool = False, take_over: bool = False) -> pd.DataFrame:
    """Continue the sweep in ``experiment_dir`` after its driver stopped; return the results.
    Refused while another driver runs it (``take_over``: see :func:`run_sweep`)."""
    configure_logging()
    exp = Path(experiment_dir).expanduser().resolve()
    if not (exp / SWEEP_FILE).is_file():
        raise NotAnExperimentError(f"{exp}: no {SWEEP_FILE}; not a sweep's experiment folder")
    with driver_lock(exp, take_over=take_over) as lock:
        lock.announce()
        info = load_sweep_info(exp)
        if not info:
            raise NotAnExperimentError(f"{exp}: no {SWEEP_FILE}; not a sweep's experiment folder")
        cfg = SweepConfig.from_dict(info["config"]).replace(experiment_dir=str(exp))
        tune_path = info["tune_path"] if cfg.storage_path else str(exp / TUNE_NAME)
        from ray import tune

        if not tune.Tuner.can_restore(tune_path):
            raise NotAnExperimentError(
                f"{exp}: no Ray Tune state at {tune_path} to resume (the driver stopped before "
                "the first trial started?); start it again with `sae-sweep sweep CONFIG` and a "
                "new experiment_dir")
        return _run(cfg, int(info["d_in"]), tune_path, restore=True, address=address,
                    verbose=verbose, widths=info.get("d_in_by_hook"))


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
         address: Optional[str], verbose: bool = False,
         widths: Optional[dict[str, int]] = None) -> pd.DataFrame:
    from ray import tune

    from .console import ConsoleSettings
    from .live_view import ConsoleCallback
    from .results_callback import ResultsCallback
    from .trainable import train_trial
    from .tune_output import CheckpointRepair, InterruptWatch, sweep_output

    # An intermediate report may lack an objective metric (a two-phase trial reports
    # ce_loss_delta only from its fine-tune on); the searcher reads the final report, which the
    # trial's reporter guarantees carries every objective metric, and ASHA skips reports
    # without its metric. Ray's strict check would otherwise end the sweep at the first one.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    from .confirm import confirm_planned

    job = {"config": cfg.to_dict(), "d_in": d_in, "d_in_by_hook": widths}
    trainable = with_trial_resources(tune.with_parameters(train_trial, job=job), cfg)
    watch = InterruptWatch()
    callbacks = [CheckpointRepair(), watch,
                 ResultsCallback(cfg.experiment_path, interrupt=watch),
                 ConsoleCallback(ConsoleSettings.from_sweep(cfg, resumed=restore))]
    started = time.monotonic()
    exp = cfg.experiment_path
    try:
        with sweep_output(exp, verbose=verbose) as out:
            # the study opens before Ray starts: a storage error costs nothing
            tune_config = None if restore else _tune_config(cfg, d_in, widths)
            with ray_session(address, on_start=out.capture_worker_output):
                if not (restore and confirm_planned(exp)):  # a planned confirm: search done
                    _fit(cfg, tune_path, restore, trainable, tune_config, callbacks, out, watch)
                if cfg.confirm is not None and not watch.interrupted:
                    _confirm(cfg, tune_path, restore, trainable, out, watch)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune's run began
        watch.note_interrupt()
    results = _results_or_empty(exp)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(
        results["status"].value_counts().to_dict().items())) or "no trial reported"
    took = elapsed(time.monotonic() - started)
    if watch.interrupted:
        command = resume_command(exp, address)
        logger.warning("sweep %s interrupted after %s: %s; continue it with: %s", exp.name,
                       took, counts, command)
        raise SweepInterrupted(exp, command)
    from .best import never_met_warnings
    from .summary import training_share_text

    share = training_share_text(results) if len(results) else None
    from .best import TABLE_WIDTH, wrap_line

    logger.info("%s", wrap_line(f"sweep {exp.name} finished in {took}: {counts}"
                                + (f"; {share}" if share else ""),
                                TABLE_WIDTH - len("sae-sweep: ")))  # the console's prefix

    for line in never_met_warnings(results, cfg.to_dict()["objective"],
                                   default_architecture=cfg.sae.get("architecture")):
        logger.warning("warning: %s", line)
    return results


def _confirm(cfg: SweepConfig, tune_path: str, restore: bool, trainable: Any, out: Any,
             watch: Any) -> None:
    """The confirm stage (:mod:`sweep.confirm`): Tune runs of the planned replicates, with no
    searcher (the Optuna study never sees them) and no scheduler."""
    import dataclasses

    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .confirm import ReplicateList, read_plan, run_confirm_stage
    from .console import ConsoleSettings
    from .live_view import ConsoleCallback
    from .results_callback import ResultsCallback
    from .tune_output import CheckpointRepair

    def run_round(path: str, entries: Optional[list]) -> None:
        planned = len((read_plan(cfg.experiment_path) or {}).get("replicates") or [])
        settings = dataclasses.replace(ConsoleSettings.from_sweep(cfg, resumed=entries is None),
                                       num_samples=len(entries) if entries else planned)
        callbacks = [CheckpointRepair(), watch,
                     ResultsCallback(cfg.experiment_path, interrupt=watch),
                     ConsoleCallback(settings)]
        tune_config = None if entries is None else tune.TuneConfig(
            search_alg=ConcurrencyLimiter(ReplicateList([e["config"] for e in entries]),
                                          max_concurrent=cfg.max_concurrent_trials),
            num_samples=len(entries), reuse_actors=True)
        label = None if entries is None else (
            f"confirm stage of {cfg.experiment_path.name}: {len(entries)} replicate(s), "
            f"{cfg.max_concurrent_trials} at a time")
        _fit(cfg, path, entries is None, trainable, tune_config, callbacks, out, watch,
             label=label)

    def search_configs() -> dict:
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(tune_path)
        return {t.trial_id: {k: v for k, v in (t.config or {}).items()
                             if v is None or isinstance(v, (bool, int, float, str))}
                for t in analysis.trials}

    run_confirm_stage(cfg, tune_path, resumed=restore, search_configs=search_configs,
                      run_round=run_round, can_restore=tune.Tuner.can_restore,
                      interrupted=lambda: bool(watch.interrupted))


def _fit(cfg: SweepConfig, tune_path: str, restore: bool, trainable: Any, tune_config: Any,
         callbacks: list, out: Any, watch: Any, *, label: Optional[str] = None) -> None:
    """Build the Tuner (new, or restored from ``tune_path``) and run it (``label``: what the
    starting line says instead of the search's trials and objective)."""
    from ray import tune

    from .tune_output import TUNE_VERBOSITY

    exp = cfg.experiment_path
    if restore:
        tuner = _storage_call(lambda: tune.Tuner.restore(
            tune_path, trainable=trainable, resume_unfinished=True,
            resume_errored=False, restart_errored=False), cfg)
        # the restored RunConfig is the first run's: this run's console and callbacks
        _update_run_config(tuner, callbacks=callbacks, verbose=TUNE_VERBOSITY,
                           progress_reporter=out.progress_reporter())
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=Path(tune_path).name,
                storage_path=str(Path(tune_path).parent) if "://" not in tune_path
                else tune_path.rsplit("/", 1)[0],
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
                callbacks=callbacks,
                verbose=TUNE_VERBOSITY,
                progress_reporter=out.progress_reporter(),
            ),
        )
    hooks = f" on each of {len(cfg.hooks)} hooks ({', '.join(cfg.hooks)})" if cfg.is_suite else ""
    if label is not None:
        logger.info("starting the %s", label)
    elif restore and Path(tune_path).name != Path(_tune_path(cfg)).name:
        logger.info("resuming the confirm stage of %s (%s)", exp.name, Path(tune_path).name)
    else:
        logger.info("%s sweep %s: %d trials%s, %d at a time, %s",
                    "resuming" if restore else "starting", exp.name, cfg.num_samples, hooks,
                    cfg.max_concurrent_trials, _objective_text(cfg))
    logger.info("Ray's log: %s", display_path(out.log_path))
    with out.tune_run(), watch.around_fit():
        tuner.fit()


def _results_or_empty(exp: Path) -> pd.DataFrame:
    try:
        return load_results(exp)
    except ResultsNotFoundError:
        return pd.DataFrame(columns=["trial_id", "status"])


def _storage_call(fn: Any, cfg: SweepConfig) -> Any:
    """``fn()``, with an Optuna/SQLAlchemy storage error as one line (:class:`StorageError`)."""
    try:
        return fn()
    except Exception as exc:
        if not _is_storage_error(exc):
            raise
        raise StorageError(f"SweepConfig.optuna_storage: the Optuna study {cfg.study_name!r} at "
                           f"{cfg.optuna_storage_url()} cannot be opened: "
                           f"{_last_line(exc)}") from None


def _is_storage_error(exc: BaseException) -> bool:
    try:
        import sqlalchemy.exc
    except ImportError:  # pragma: no cover
        sqlalchemy = None  # type: ignore[assignment]
    import optuna

    kinds: tuple = (optuna.exceptions.StorageInternalError,)
    if sqlalchemy is not None:
        kinds += (sqlalchemy.exc.SQLAlchemyError,)
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


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


def _tune_config(cfg: SweepConfig, d_in: int, widths: Optional[dict[str, int]] = None) -> Any:
    if cfg.is_suite:
        from .suite import suite_tune_config

        return suite_tune_config(cfg, widths or {}, make_searcher)
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
    objective = cfg.objective
    return _storage_call(lambda: SweepSearcher(
        space=SearchSpace(cfg, d_in),
        metric=list(objective.metrics) if objective.is_pareto else objective.metrics[0],
        mode=list(objective.modes) if objective.is_pareto else objective.modes[0],
        sampler=sampler, study_name=cfg.study_name,
        storage=optuna.storages.RDBStorage(cfg.optuna_storage_url()),
        constraints=constraints, record_dir=str(cfg.experiment_path),
    ), cfg)


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
