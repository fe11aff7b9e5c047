"""From one trial's sampled parameters to the trainer's SAEConfig and TrainingConfig.

The fixed settings of the sweep are overlaid with the trial's parameters; ``d_in`` (and a
transcoder's ``d_out``) and the hook fields come from the cache and the sweep's hooks; the token
budget and the seed from the sweep (a confirm-stage replicate's ``seed`` parameter overrides it;
its ``replicate_of`` label is skipped). :func:`check_space`
builds the configs for the corners of the search space before any trial starts, so a bad
combination (e.g. a fixed field that the trainer rejects) fails the sweep at once with the
trainer's own message instead of failing every trial.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Optional

from activation_cache import ConfigError, parse_block_hook

from .replicates import LABELS
from .search_space import SearchSpace
from .sweep_config import SweepConfig, param_target


def build_trial_configs(cfg: SweepConfig, params: Mapping[str, Any], d_in: int,
                        d_out: Optional[int] = None):
    """``(SAEConfig, TrainingConfig)`` of the trial with sampled ``params``; ``d_out``: the
    width of ``cfg.hook_out`` (transcoder sweeps)."""
    from trainer import TrainingConfig, sae_config_from_dict

    sae: dict[str, Any] = {"device": "auto"}
    sae.update(cfg.sae)
    sae.update({"d_in": int(d_in), "hook_spec": cfg.hook})
    block = parse_block_hook(cfg.hook)
    if block is not None:
        sae.update({"hook_layer": block.layer, "hook_name": block.point})
    if cfg.hook_out is not None:
        if d_out is None:
            raise ConfigError(f"SweepConfig.hook_out: the width of {cfg.hook_out!r} is unknown "
                              "(not read from the cache)")
        sae.update({"hook_spec_out": cfg.hook_out, "d_out": int(d_out)})
    training: dict[str, Any] = {"seed": cfg.seed, "show_progress": False}
    training.update(cfg.training)
    training["max_tokens"] = cfg.tokens_per_trial
    for name, value in params.items():
        if name == "expansion_factor" or name in LABELS:
            continue  # the space also returns the derived d_sae; labels configure nothing
        (sae if param_target(name) == "sae" else training)[name] = value
    return sae_config_from_dict(sae), TrainingConfig.from_dict(training)


def output_width(cfg: SweepConfig) -> Optional[int]:
    """The width of the sweep's ``hook_out`` in its cache (None: an SAE sweep); a one-line
    ConfigError when the cache does not store it."""
    if cfg.hook_out is None:
        return None
    from activation_cache import UserError, open_cache

    try:
        reader = open_cache(cfg.cache, verify=False)
    except UserError as exc:
        raise ConfigError(f"SweepConfig.cache: {exc}") from None
    if cfg.hook_out not in reader.hooks:
        raise ConfigError(f"SweepConfig.hook_out: {cfg.hook_out!r} is not stored in cache "
                          f"{cfg.cache} (it stores {', '.join(reader.hooks)}); a transcoder "
                          "sweep needs a cache with both hooks")
    return int(reader.d_in(cfg.hook_out))


def check_space(cfg: SweepConfig, d_in: int) -> None:
    """Build the configs at the corners of the space; raise ConfigError naming the problem."""
    d_out = output_width(cfg)
    space = SearchSpace(cfg, d_in)
    names = list(cfg.search_space)
    for corner in itertools.product(*(cfg.search_space[n].corner_values() for n in names)):
        trial = _FixedTrial(dict(zip(names, corner)))
        derived = space(trial)
        params = {**trial.params, **derived}
        try:
            build_trial_configs(cfg, params, d_in, d_out)
        except ConfigError as exc:
            raise ConfigError(f"SweepConfig: the trial {params} would be invalid: {exc}") from None


class _FixedTrial:
    """Minimal stand-in for an Optuna trial that returns preset values (clipped to the range
    the space asks for, as the constraints require)."""

    def __init__(self, values: dict[str, Any]):
        self.values = values
        self.params: dict[str, Any] = {}

    def _take(self, name: str, value: Any) -> Any:
        self.params[name] = value
        return value

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return self._take(name, self.values[name])

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return self._take(name, int(min(max(self.values[name], low), high)))

    def suggest_float(self, name: str, low: float, high: float, step: Any = None,
                      log: bool = False) -> float:
        return self._take(name, float(min(max(self.values[name], low), high)))
