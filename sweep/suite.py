"""A suite: one sweep over several hooks, each with its own search, in one Ray Tune run.

``hooks:`` in the sweep YAML (a list, a layer-range pattern such as
``blocks.{0..29..4}.hook_resid_post`` or a glob) is resolved against the hooks the cache stores
(:func:`resolve_hooks`, with ``activation_cache.expand_hook_pattern``'s "did you mean"). Each
hook is then searched as a one-hook sweep would be (:func:`hook_config`: the same settings,
``hook`` set, its own Optuna study ``<study_name>.<hook>`` in the same storage, its own width
``d_in`` -- so ``expansion_factor`` scales with the hook), with ``num_samples`` trials of its own.

:class:`SuiteSearcher` is the one searcher Tune sees: ``suggest`` hands each new trial to the
hook with the fewest trials started so far (ties in the order written) and tags the trial's
config with ``hook`` (the results table's ``hook`` column); results and completions go back to
the hook's own searcher, so TPE never sees another hook's evidence. Its state (the per-hook
searchers, which trial belongs to which hook, how many each started) pickles with Tune's
experiment state, so ``--resume`` continues every hook where it was; a restored searcher closes
each study's orphans (see :mod:`sweep.searcher`). ASHA compares trials of one hook only
(:class:`HookGroupedScheduler`: one ASHA per hook). Concurrency, the time budget, failures and
the resources are the one run's, shared by all hooks.
"""

from __future__ import annotations

import pickle
from typing import Any, Optional

from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher

from activation_cache import ConfigError, UserError, parse_block_hook

from .sweep_config import SweepConfig

HOOK_KEY = "hook"
"""The trial config key (and results column) naming a suite trial's hook."""


def resolve_hooks(cfg: SweepConfig) -> SweepConfig:
    """``cfg`` with ``hooks`` expanded to exact names stored in its cache (one-line ConfigError
    naming what is wrong and what the cache stores)."""
    from activation_cache import expand_hook_pattern, open_cache

    try:
        reader = open_cache(cfg.cache, verify=False)
    except UserError as exc:
        raise ConfigError(f"SweepConfig.cache: {exc} (build it first with `sae-sweep cache "
                          "CACHE.yaml`)") from None
    n_layers = (reader.manifest.get("model") or {}).get("n_layers")
    try:
        hooks = expand_hook_pattern(cfg.hooks, list(reader.hooks), n_layers=n_layers,
                                    field="SweepConfig.hooks")
    except UserError as exc:
        raise ConfigError(f"{exc} (in cache {cfg.cache})") from None
    return cfg.replace(hooks=hooks)


def suite_hooks(cfg: SweepConfig) -> list[str]:
    """The hooks of a resolved suite, in order (``[cfg.hook]`` for a one-hook sweep)."""
    if not cfg.is_suite:
        return [str(cfg.hook)]
    return [cfg.hooks] if isinstance(cfg.hooks, str) else list(cfg.hooks)


def hook_config(cfg: SweepConfig, hook: str) -> SweepConfig:
    """The one-hook sweep that ``hook``'s search is: ``cfg`` with ``hook`` set and its own
    Optuna study name."""
    if not cfg.is_suite:
        return cfg
    return cfg.replace(hook=hook, hooks=None, study_name=f"{cfg.study_name}.{hook}")


def suite_widths(cfg: SweepConfig, cache_width: Any) -> dict[str, int]:
    """Each hook's width in the cache, checked like a one-hook sweep's (``cache_width``: the
    driver's check of one hook)."""
    return {hook: cache_width(hook_config(cfg, hook)) for hook in suite_hooks(cfg)}


def hook_label(hook: str) -> str:
    """``L6`` for ``blocks.6.hook_resid_post`` (``L6 mlp_out`` when the suite mixes points is
    left to the caller); the name itself outside the blocks."""
    block = parse_block_hook(hook)
    return f"L{block.layer}" if block else hook


def hook_layer(hook: Any) -> Optional[int]:
    block = parse_block_hook(hook) if isinstance(hook, str) else None
    return None if block is None else block.layer


class SuiteSearcher(Searcher):
    """Routes Tune's trials over one searcher per hook (see the module docstring)."""

    def __init__(self, searchers: dict[str, Searcher], num_samples: dict[str, int], *,
                 metric: Any = None, mode: Any = None):
        super().__init__(metric=metric, mode=mode)
        self.searchers = dict(searchers)
        self.num_samples = dict(num_samples)
        self.owner: dict[str, str] = {}
        self.started: dict[str, int] = {h: 0 for h in self.searchers}

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return False  # every hook's searcher has its space, metric and mode

    def suggest(self, trial_id: str) -> Optional[dict]:
        open_hooks = [h for h in self.searchers if self.started[h] < self.num_samples[h]]
        if not open_hooks:
            return Searcher.FINISHED
        for hook in sorted(open_hooks, key=lambda h: self.started[h]):  # stable: YAML order
            params = self.searchers[hook].suggest(trial_id)
            if params is None or params == Searcher.FINISHED:
                continue
            self.owner[trial_id] = hook
            self.started[hook] += 1
            return {HOOK_KEY: hook, **params}
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        hook = self.owner.get(trial_id)
        if hook is not None:
            self.searchers[hook].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None,
                          error: bool = False) -> None:
        hook = self.owner.get(trial_id)
        if hook is not None:
            self.searchers[hook].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        for searcher in self.searchers.values():
            fail_orphans = getattr(searcher, "fail_orphans", None)
            if fail_orphans is not None:
                fail_orphans()


class HookGroupedScheduler(FIFOScheduler):
    """ASHA within each hook: a suite's trials are compared only with trials of their own hook
    (an fvu at layer 20 says nothing about one at layer 6). ``asha``: ASHAScheduler keywords."""

    def __init__(self, **asha: Any):
        super().__init__()
        self.asha = asha
        self.groups: dict[str, Any] = {}

    def _group(self, trial: Any) -> Any:
        from ray.tune.schedulers import ASHAScheduler

        hook = str((trial.config or {}).get(HOOK_KEY))
        if hook not in self.groups:
            self.groups[hook] = ASHAScheduler(**self.asha)
        return self.groups[hook]

    def set_search_properties(self, metric: Any, mode: Any, **spec: Any) -> bool:
        return True  # each ASHA has its metric and mode

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._group(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._group(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._group(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        group = self._group(trial)
        if trial.trial_id in getattr(group, "_trial_info", {trial.trial_id: None}):
            group.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "ASHA per hook: " + "; ".join(
            f"{hook_label(h)} stopped {getattr(g, '_num_stopped', 0)}"
            for h, g in self.groups.items())


def suite_tune_config(cfg: SweepConfig, widths: dict[str, int], make_searcher: Any) -> Any:
    """The TuneConfig of a suite: one searcher per hook (``make_searcher(one-hook config,
    d_in)``, the driver's) behind one SuiteSearcher, one concurrency limit, per-hook ASHA,
    ``num_samples`` per hook, the one time budget."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    hooks = suite_hooks(cfg)
    searchers = {h: make_searcher(hook_config(cfg, h), widths[h]) for h in hooks}
    objective = cfg.objective
    suite = SuiteSearcher(
        searchers, {h: cfg.num_samples for h in hooks},
        metric=list(objective.metrics) if objective.is_pareto else objective.metrics[0],
        mode=list(objective.modes) if objective.is_pareto else objective.modes[0])
    scheduler = None
    if cfg.scheduler.type == "asha":
        metric, mode = cfg.scheduler_metric_mode()
        scheduler = HookGroupedScheduler(
            time_attr="training_iteration", metric=metric, mode=mode, max_t=cfg.scheduler.max_t,
            grace_period=cfg.scheduler.grace_period,
            reduction_factor=cfg.scheduler.reduction_factor)
    return tune.TuneConfig(
        search_alg=ConcurrencyLimiter(suite, max_concurrent=cfg.max_concurrent_trials),
        scheduler=scheduler, num_samples=cfg.num_samples * len(hooks),
        time_budget_s=cfg.time_budget_s, reuse_actors=True)


def hook_progress(trials: list, states: dict[str, str], hooks: list[str],
                  num_samples: int) -> str:
    """The console's per-hook progress: ``L6 3/4 · L12 2/4 · L20 1/4`` (trials ended out of
    each hook's ``num_samples``); ``states``: trial id -> state."""
    done = {h: 0 for h in hooks}
    for t in trials:
        hook = (t.config or {}).get(HOOK_KEY)
        if hook in done and states.get(t.trial_id) in ("completed", "stopped", "failed"):
            done[hook] += 1
    return " · ".join(f"{hook_label(h)} {done[h]}/{num_samples}" for h in hooks)
