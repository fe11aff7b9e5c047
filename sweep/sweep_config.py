"""SweepConfig: everything one sweep needs, read from one YAML file and validated at load.

A sweep trains many SAEs on one activation cache. The YAML names the cache and hook, the fixed
SAE and training settings (partial :class:`trainer.SAEConfig` / :class:`trainer.TrainingConfig`
dicts: ``d_in`` and the hook fields come from the cache), the token budget of every trial, the
search space (``search_space``: one :class:`ParamSpec` per searched field), the objective (one
metric and mode, optionally with constraints such as an L0 limit, or several metrics and modes
for a Pareto front), and how to run it on Ray (trials, concurrency, resources, retries, time
budget, scheduler, seed, where results go). See ``examples/sweep.yaml``.

Searched fields are set by name: a field of ``SAEConfig`` (common, or owned by an
architecture) goes to the SAE config, a field of ``TrainingConfig`` to the training config, and
``expansion_factor`` sets ``d_sae = expansion_factor * d_in``. Which architectures exist, which
fields each owns, which are searchable and capped by the width, which config a field belongs to
and which metrics a trial reports all come from one trainer call, ``trainer.field_catalog()``:
the sweep keeps no list of its own. Constraints between fields (``top_k < d_sae``, an
architecture's own fields) are enforced by the define-by-run space in
:mod:`sweep.search_space`, never by failing trials.

A **transcoder** sweep names the output hook too (``hook_out``, e.g. ``blocks.6.hook_mlp_out``
for a transcoder from ``hook: blocks.6.ln2.hook_normalized``); the cache must store both, and
every drawn architecture must be a transcoder one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from activation_cache import ConfigError, StrictConfig

PARAM_TYPES = ("int", "float", "categorical")
MODES = ("min", "max")
SAMPLERS = ("tpe", "nsgaii", "random")
SCHEDULERS = ("none", "asha")


@dataclass
class ParamSpec(StrictConfig):
    """The domain of one searched hyperparameter (an Optuna distribution)."""

    type: str
    """``int``, ``float`` or ``categorical``."""
    low: Optional[float] = None
    """Lower bound (int/float), inclusive."""
    high: Optional[float] = None
    """Upper bound (int/float), inclusive (unlike ``tune.randint``). For ``top_k`` the space also
    caps it at ``d_sae - 1``."""
    log: bool = False
    """Sample on a log scale (needs ``low > 0``); the usual choice for lr, d_sae, top_k and
    penalties."""
    step: Optional[float] = None
    """Discretisation step (int/float, not with ``log``); ints default to 1."""
    choices: Optional[list] = None
    """The values of a ``categorical`` parameter."""

    def validate(self) -> None:
        self._require(self.type in PARAM_TYPES, "type",
                      f"must be one of {', '.join(PARAM_TYPES)}, got {self.type!r}")
        if self.type == "categorical":
            self._require(isinstance(self.choices, (list, tuple)) and len(self.choices) > 0,
                          "choices", "a categorical parameter needs a non-empty list of choices")
            self._require(self.low is None and self.high is None and self.step is None
                          and not self.log, "choices",
                          "a categorical parameter takes only choices (no low/high/step/log)")
            return
        self._require(self.choices is None, "choices",
                      f"only categorical parameters take choices (type is {self.type!r})")
        for name in ("low", "high"):
            value = getattr(self, name)
            self._require(_is_number(value), name,
                          f"a {self.type} parameter needs a numeric {name}, got {value!r}")
        if self.type == "int":
            for name in ("low", "high"):
                value = getattr(self, name)
                self._require(float(value).is_integer(), name,
                              f"must be an integer for an int parameter, got {value!r}")
                setattr(self, name, int(value))
            if self.step is not None:
                self._require(float(self.step).is_integer() and self.step >= 1, "step",
                              f"must be a positive integer, got {self.step!r}")
                self.step = int(self.step)
        else:
            self.low, self.high = float(self.low), float(self.high)
        self._require(self.low <= self.high, "high",
                      f"must be >= low ({self.low}), got {self.high}")
        if self.log:
            self._require(self.low > 0, "low", f"must be > 0 with log: true, got {self.low}")
            self._require(self.step in (None, 1) if self.type == "int" else self.step is None,
                          "step", "cannot be combined with log: true")
        if self.step is not None:
            self._require(self.step > 0, "step", f"must be > 0, got {self.step}")

    # -- helpers used by the space and by validation -------------------------------------
    def values_bounds(self) -> tuple[Any, Any]:
        """The smallest and largest value this domain can produce (numeric choices only)."""
        if self.type == "categorical":
            return min(self.choices), max(self.choices)  # type: ignore[type-var]
        return self.low, self.high

    def corner_values(self) -> list[Any]:
        """Representative values used to dry-run config construction (both ends / all choices)."""
        if self.type == "categorical":
            return list(self.choices)  # type: ignore[arg-type]
        return [self.low, self.high]


@dataclass
class ConstraintSpec(StrictConfig):
    """A bound on a reported metric, e.g. ``{metric: l0, max: 64}``.

    Optuna's sampler is told how far a finished trial is from feasibility, so it learns to
    propose feasible trials; ``sae-sweep best`` ranks feasible trials first."""

    metric: str
    """A field of the metrics record (``l0``, ``fvu``, ``dead_fraction``, ...)."""
    min: Optional[float] = None
    """Feasible when metric >= min."""
    max: Optional[float] = None
    """Feasible when metric <= max."""

    def validate(self) -> None:
        self._require(isinstance(self.metric, str) and bool(self.metric), "metric",
                      f"must be a metric name, got {self.metric!r}")
        self._require(self.min is not None or self.max is not None, "max",
                      "give min, max or both")
        for name in ("min", "max"):
            value = getattr(self, name)
            if value is not None:
                self._require(_is_number(value), name, f"must be a number, got {value!r}")
                setattr(self, name, float(value))
        if self.min is not None and self.max is not None:
            self._require(self.min <= self.max, "max", f"must be >= min ({self.min})")

    def violation(self, value: Optional[float]) -> float:
        """Optuna's convention: <= 0 when satisfied, the distance to the bound otherwise.
        A missing or non-finite value counts as infeasible (1.0)."""
        if value is None or not math.isfinite(value):
            return 1.0
        worst = -math.inf
        if self.max is not None:
            worst = max(worst, value - self.max)
        if self.min is not None:
            worst = max(worst, self.min - value)
        return float(worst)

    def as_query(self) -> str:
        """The same constraint as a pandas query (used by ``best``)."""
        parts = []
        if self.min is not None:
            parts.append(f"`{self.metric}` >= {self.min!r}")
        if self.max is not None:
            parts.append(f"`{self.metric}` <= {self.max!r}")
        return " and ".join(parts)


@dataclass
class ObjectiveConfig(StrictConfig):
    """What the search optimises: one metric, or several for a Pareto front."""

    metric: Union[str, list] = "fvu"
    """A metrics-record field (``fvu``, ``ce_loss_delta``, ``kl_div``, ``l0``, ...), or a list of
    fields for a multi-objective (Pareto) search."""
    mode: Union[str, list] = "min"
    """``min`` or ``max`` (one per metric when ``metric`` is a list)."""
    constraints: list[ConstraintSpec] = field(default_factory=list)
    """Bounds that a good trial must satisfy, e.g. ``[{metric: l0, max: 64}]``."""

    def validate(self) -> None:
        metrics = [self.metric] if isinstance(self.metric, str) else self.metric
        modes = [self.mode] if isinstance(self.mode, str) else self.mode
        self._require(isinstance(metrics, (list, tuple)) and len(metrics) > 0
                      and all(isinstance(m, str) and m for m in metrics), "metric",
                      f"must be a metric name or a non-empty list of names, got {self.metric!r}")
        self._require(len(set(metrics)) == len(metrics), "metric",
                      f"lists a metric twice: {metrics}")
        self._require(isinstance(modes, (list, tuple)) and all(m in MODES for m in modes),
                      "mode", f"must be 'min' or 'max' (or a list of them), got {self.mode!r}")
        if len(modes) == 1 and len(metrics) > 1:
            modes = list(modes) * len(metrics)
        self._require(len(modes) == len(metrics), "mode",
                      f"needs one mode per metric ({len(metrics)}), got {len(modes)}")
        self.metric = metrics[0] if len(metrics) == 1 else list(metrics)
        self.mode = modes[0] if len(modes) == 1 else list(modes)

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,) if isinstance(self.metric, str) else tuple(self.metric)

    @property
    def modes(self) -> tuple[str, ...]:
        return (self.mode,) if isinstance(self.mode, str) else tuple(self.mode)

    @property
    def is_pareto(self) -> bool:
        return len(self.metrics) > 1

    def monitored_metrics(self) -> tuple[str, ...]:
        """Objective and constraint metrics: a trial reporting a non-finite one has diverged."""
        names = list(self.metrics)
        names += [c.metric for c in self.constraints if c.metric not in names]
        return tuple(names)


@dataclass
class SchedulerConfig(StrictConfig):
    """Early stopping of unpromising trials (Optuna's pruner is off inside Ray; this is Tune's)."""

    type: str = "none"
    """``none`` (every trial runs its full token budget) or ``asha``."""
    metric: Optional[str] = None
    """Intermediate metric ASHA compares (default: the first objective metric)."""
    mode: Optional[str] = None
    """``min``/``max`` for ``metric`` (default: the objective's mode for it)."""
    grace_period: int = 2
    """Reports a trial makes before ASHA may stop it."""
    reduction_factor: float = 2.0
    """ASHA keeps 1/reduction_factor of the trials at each rung."""
    max_t: int = 100
    """The most reports a trial makes (rungs are spaced up to it)."""

    def validate(self) -> None:
        self._require(self.type in SCHEDULERS, "type",
                      f"must be one of {', '.join(SCHEDULERS)}, got {self.type!r}")
        if self.mode is not None:
            self._require(self.mode in MODES, "mode", f"must be min or max, got {self.mode!r}")
        self._require(isinstance(self.grace_period, int) and self.grace_period >= 1,
                      "grace_period", f"must be an integer >= 1, got {self.grace_period!r}")
        self._require(self.reduction_factor > 1, "reduction_factor",
                      f"must be > 1, got {self.reduction_factor}")
        self._require(isinstance(self.max_t, int) and self.max_t >= self.grace_period, "max_t",
                      f"must be an integer >= grace_period ({self.grace_period}), "
                      f"got {self.max_t!r}")


@dataclass
class ResourcesConfig(StrictConfig):
    """What one trial reserves on a Ray node."""

    cpu: float = 1.0
    """CPU cores per trial; torch in the trial uses this many threads (at least 1)."""
    gpu: float = 0.0
    """GPUs per trial; fractions (e.g. 0.25) pack several small SAEs on one GPU."""
    custom: dict = field(default_factory=dict)
    """Custom Ray resources per trial, e.g. ``{sae_slot: 1}`` to pin trials to tagged nodes."""

    def validate(self) -> None:
        self._require(_is_number(self.cpu) and self.cpu > 0, "cpu",
                      f"must be > 0, got {self.cpu!r}")
        self._require(_is_number(self.gpu) and self.gpu >= 0, "gpu",
                      f"must be >= 0, got {self.gpu!r}")
        if self.gpu > 1:
            self._require(float(self.gpu).is_integer(), "gpu",
                          f"above 1 must be a whole number of GPUs, got {self.gpu}")
        self._require(isinstance(self.custom, dict) and all(
            isinstance(k, str) and _is_number(v) and v > 0 for k, v in self.custom.items()),
            "custom", f"must map resource names to positive amounts, got {self.custom!r}")
        self._require(not ({"cpu", "gpu", "CPU", "GPU", "memory"} & set(self.custom)), "custom",
                      "use the cpu/gpu fields for CPUs and GPUs")

    def as_tune_resources(self) -> dict[str, float]:
        return {"cpu": float(self.cpu), "gpu": float(self.gpu),
                **{k: float(v) for k, v in self.custom.items()}}


@dataclass
class ConfirmConfig(StrictConfig):
    """The confirm stage (:mod:`sweep.confirm`): after the search, re-train the ``top`` best
    configurations with ``seeds`` new seeds each, so ``best`` can rank on seed means.

    A replicate is the original trial's configuration with another ``training.seed`` (which
    seeds both the SAE's initial weights and the training-data order); its results row names
    the trial it replicates (``replicate_of``). Replicates never reach the Optuna study."""

    top: int = 1
    """How many configurations to confirm: the best completed trials meeting the constraints,
    ranked on the objective's (first) validation metric; per hook when the table has a
    ``hook`` column."""
    seeds: int = 2
    """New seeds per configuration; with the original trial that makes ``seeds + 1`` runs."""

    def validate(self) -> None:
        for name in ("top", "seeds"):
            value = getattr(self, name)
            self._require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                          name, f"must be an integer >= 1, got {value!r}")


@dataclass
class SweepConfig(StrictConfig):
    """One sweep: the data, the fixed settings, the search space, the objective and the run."""

    cache: str
    """Activation cache built by ``sae-sweep cache``: a local path or a pyarrow URI
    (``s3://bucket/prefix``). Every trial reads this same cache; on a cluster it must be
    reachable from every node (shared storage or object store)."""
    experiment_dir: str
    """Where the sweep's results live: ``results.parquet``, ``history.parquet``, ``optuna.db``,
    the config copy and (unless ``storage_path`` is set) Ray Tune's state and checkpoints."""
    hook: Optional[str] = None
    """The hook whose activations the SAEs read (and reconstruct, unless ``hook_out`` is set;
    must be stored in the cache), e.g. ``blocks.6.hook_resid_post``. Give ``hook`` or
    ``hooks``."""
    hooks: Optional[Union[str, list]] = None
    """A **suite**: several hooks, each with its own search (see :mod:`sweep.suite`) -- a list
    of names, a layer-range pattern (``blocks.{0..29..4}.hook_resid_post``) or a glob
    (``blocks.*.hook_resid_post``), resolved against the hooks the cache stores. Every hook
    gets ``num_samples`` trials and its own Optuna study; all share one Ray Tune run."""
    tokens_per_trial: int = 2_000_000
    """Training-token budget of every trial (sets the training config's token budget)."""
    sae: dict = field(default_factory=dict)
    """Fixed SAE settings (fields of ``trainer.SAEConfig``; ``d_in`` and the hook fields come
    from the cache and ``hook``)."""
    training: dict = field(default_factory=dict)
    """Fixed training settings (fields of ``trainer.TrainingConfig``)."""
    search_space: dict[str, ParamSpec] = field(default_factory=dict)
    """Searched fields by name (an SAEConfig or TrainingConfig field, or ``expansion_factor``)
    and their domains."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """What the search optimises (and constraints)."""
    num_samples: int = 8
    """Number of trials."""
    max_concurrent_trials: int = 2
    """Trials running at once. Keep it well below num_samples: with too many in flight TPE
    proposes before it has learned anything and the search degenerates to random."""
    time_budget_s: Optional[float] = None
    """Stop starting/continuing trials after this many seconds (None: no limit)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Early stopping (none or ASHA)."""
    resources_per_trial: ResourcesConfig = field(default_factory=ResourcesConfig)
    """CPUs, GPUs (fractions allowed) and custom resources reserved by each trial."""
    max_failures: int = 2
    """Retries of a trial whose process or node dies; each retry resumes from its last
    checkpoint. A trial that diverges (NaN) is not retried: it fails with the reason recorded."""
    seed: int = 0
    """Seed of the Optuna sampler (and the default training seed of every trial)."""
    sampler: str = "tpe"
    """Optuna sampler: ``tpe`` (default; multi-objective TPE for a Pareto objective),
    ``nsgaii`` (Pareto objectives) or ``random``."""
    n_startup_trials: Optional[int] = None
    """Random trials before TPE starts modelling (default: max(2, min(10, num_samples // 3)))."""
    study_name: Optional[str] = None
    """Name of the Optuna study inside ``optuna_storage``; default ``sae-sweep-<name of
    experiment_dir>``, so sweeps sharing one ``optuna_storage`` never mix their trials."""
    optuna_storage: Optional[str] = None
    """Optuna storage URL (any RDB URL Optuna accepts); default
    ``sqlite:///EXPERIMENT_DIR/optuna.db`` so the search state survives the driver."""
    storage_path: Optional[str] = None
    """Ray Tune storage (local folder or ``s3://...``) for trial checkpoints; default
    ``EXPERIMENT_DIR/tune``. On a multi-node cluster use shared storage."""
    checkpoints_to_keep: int = 2
    """Checkpoints kept per trial (the newest ones; the final one is always kept)."""
    hook_out: Optional[str] = None
    """Transcoders: the hook they reconstruct (stored in the cache too), e.g.
    ``blocks.6.hook_mlp_out``; None: the SAEs reconstruct ``hook``."""
    confirm: Optional[ConfirmConfig] = None
    """Seed-aware ranking, e.g. ``{top: 2, seeds: 2}``: after the search, re-train the best
    configurations with new seeds in the same run (see :class:`ConfirmConfig`); None: no
    confirm stage."""

    def validate(self) -> None:
        for name in ("cache", "experiment_dir"):
            value = getattr(self, name)
            self._require(isinstance(value, str) and bool(value.strip()), name,
                          f"must be a non-empty string, got {value!r}")
        self._require((self.hook is None) != (self.hooks is None), "hook",
                      "give `hook` (one hook) or `hooks` (a suite: a list or a pattern such as "
                      "blocks.{0..29..4}.hook_resid_post), not both"
                      if self.hook is not None else "is missing: name the hook the SAEs read "
                      "(hook: blocks.6.hook_resid_post) or several (hooks: [...])")
        if self.hook is not None:
            self._require(isinstance(self.hook, str) and bool(self.hook.strip()), "hook",
                          f"must be a non-empty string, got {self.hook!r}")
        else:
            entries = [self.hooks] if isinstance(self.hooks, str) else self.hooks
            self._require(isinstance(entries, list) and len(entries) > 0 and all(
                isinstance(h, str) and h.strip() for h in entries), "hooks",
                f"must be a hook name, a pattern or a non-empty list of them, got {self.hooks!r}")
            self._require(self.hook_out is None, "hook_out",
                          "a suite (hooks) reconstructs each hook itself; transcoder suites are "
                          "not supported: run one sweep per hook pair")
        if self.hook_out is not None:
            self._require(isinstance(self.hook_out, str) and bool(self.hook_out.strip()),
                          "hook_out", f"must be a hook name or null, got {self.hook_out!r}")
        for name in ("tokens_per_trial", "num_samples", "max_concurrent_trials"):
            value = getattr(self, name)
            self._require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                          name, f"must be an integer >= 1, got {value!r}")
        self._require(isinstance(self.max_failures, int) and self.max_failures >= 0,
                      "max_failures", f"must be an integer >= 0, got {self.max_failures!r}")
        self._require(isinstance(self.seed, int) and not isinstance(self.seed, bool)
                      and 0 <= self.seed < 2**32, "seed",
                      f"must be an integer in [0, 2**32) (Optuna's seed range), got {self.seed!r}")
        if self.time_budget_s is not None:
            self._require(_is_number(self.time_budget_s) and self.time_budget_s > 0,
                          "time_budget_s", f"must be > 0 seconds, got {self.time_budget_s!r}")
        self._require(self.sampler in SAMPLERS, "sampler",
                      f"must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.n_startup_trials is not None:
            self._require(isinstance(self.n_startup_trials, int) and self.n_startup_trials >= 0,
                          "n_startup_trials",
                          f"must be an integer >= 0, got {self.n_startup_trials!r}")
        self._require(isinstance(self.checkpoints_to_keep, int) and self.checkpoints_to_keep >= 1,
                      "checkpoints_to_keep", f"must be >= 1, got {self.checkpoints_to_keep!r}")
        if self.study_name is None:
            self.study_name = f"sae-sweep-{Path(self.experiment_dir).expanduser().resolve().name}"
        self._require(isinstance(self.study_name, str) and bool(self.study_name), "study_name",
                      "must be a non-empty string")
        self._require(isinstance(self.sae, dict), "sae", "must be a mapping of SAEConfig fields")
        self._require(isinstance(self.training, dict), "training",
                      "must be a mapping of TrainingConfig fields")
        self._require(isinstance(self.search_space, dict), "search_space",
                      "must map field names to domains ({type: int, low: .., high: ..})")
        for name, spec in list(self.search_space.items()):
            if not isinstance(spec, ParamSpec):
                if not isinstance(spec, dict):
                    self._fail(f"search_space.{name}",
                               f"must be a domain mapping such as {{type: int, low: 8, high: 64}}"
                               f", got {spec!r}")
                try:
                    self.search_space[name] = ParamSpec.from_dict(spec)
                except ConfigError as exc:
                    self._fail(f"search_space.{name}", f"-> {exc}")
        self._require(len(self.search_space) > 0, "search_space",
                      "is empty: give at least one searched field (e.g. d_sae, lr)")
        self._validate_fields()
        self._validate_space()
        if self.confirm is not None:
            self._require(isinstance(self.confirm, ConfirmConfig), "confirm",
                          "must be a mapping such as {top: 2, seeds: 2}")
            self._require("seed" not in self.search_space, "confirm",
                          "re-trains configurations with new seeds, so seed cannot be searched "
                          "too; remove search_space.seed or confirm")
            self._require(self.confirm.top <= self.num_samples, "confirm.top",
                          f"must be <= num_samples ({self.num_samples}), got {self.confirm.top}")

    # -- field routing ---------------------------------------------------------------------
    def architectures(self) -> list[str]:
        """The architectures this sweep can draw (searched choices, else the fixed one)."""
        if "architecture" in self.search_space:
            return list(self.search_space["architecture"].choices or [])
        return [self.sae.get("architecture", catalog().default_architecture)]

    def _validate_fields(self) -> None:
        cat = catalog()
        sae_fields, train_fields = cat.sae_fields, frozenset(cat.training_fields)
        for key in self.sae:
            if key not in sae_fields and key in train_fields:
                self._fail(f"sae.{key}", "is a training field: move it to the `training:` block")
            self._require(key in sae_fields, f"sae.{key}",
                          f"unknown SAEConfig field; known: {', '.join(sorted(sae_fields))}")
            self._require(key not in cat.data_fields, f"sae.{key}",
                          "is set by the sweep (from the cache, `hook` and `hook_out`); remove it")
        for key in self.training:
            if key not in train_fields and cat.owners(key):
                self._fail(f"training.{key}",
                           f"is not a training field: it belongs to the SAE config of "
                           f"architecture(s) {', '.join(cat.owners(key))}; move it to the "
                           "`sae:` block")
            self._require(key in train_fields, f"training.{key}",
                          f"unknown TrainingConfig field; known: {', '.join(sorted(train_fields))}")
            self._require(key != "max_tokens", "training.max_tokens",
                          "is set by tokens_per_trial (the budget of every trial); remove it")
        evaluators = self.training.get("evaluators") or ()
        if "evaluators" in self.training:
            self._require(isinstance(evaluators, (list, tuple)), "training.evaluators",
                          f"must be a list of evaluator names, got {evaluators!r}")
            import trainer

            trainer.check_evaluator_names(evaluators, where="SweepConfig.training.evaluators")
        for name in self.search_space:
            self._require(name not in cat.data_fields, f"search_space.{name}",
                          "is set by the sweep from the cache and cannot be searched")
            self._require(name in cat.searchable_fields, f"search_space.{name}",
                          "is not a searchable field of SAEConfig (or an architecture) or "
                          "TrainingConfig (nor expansion_factor)")
            where = param_target(name)
            fixed = self.sae if where == "sae" else self.training
            key = "d_sae" if name == "expansion_factor" else name
            self._require(key not in fixed, f"search_space.{name}",
                          f"is also fixed in `{where}`; remove one of them")
        self._require(not ("d_sae" in self.search_space and "expansion_factor" in self.search_space),
                      "search_space", "search d_sae or expansion_factor, not both")
        has_width = ("d_sae" in self.search_space or "expansion_factor" in self.search_space
                     or "d_sae" in self.sae)
        self._require(has_width, "search_space",
                      "the SAE width is neither searched (d_sae / expansion_factor) nor fixed "
                      "(sae.d_sae)")

    def _validate_space(self) -> None:
        cat = catalog()
        space = self.search_space
        known = list(cat.architectures)
        if "architecture" in space:
            self._require(space["architecture"].type == "categorical", "search_space.architecture",
                          "must be categorical")
        archs = self.architectures()
        self._require(all(a in known for a in archs), "search_space.architecture",
                      f"choices must be among {', '.join(known)}, got {archs}")
        # a transcoder sweep (hook_out) draws only transcoders, an SAE sweep none
        wrong = [a for a in archs if (a in cat.transcoders) != (self.hook_out is not None)]
        if wrong and self.hook_out is not None:
            self._fail("hook_out", f"is set (a transcoder sweep) but architecture(s) "
                                   f"{', '.join(wrong)} reconstruct their input; transcoder "
                                   f"architectures: {', '.join(cat.transcoders) or 'none'}")
        if wrong:
            self._fail("hook_out", f"architecture(s) {', '.join(wrong)} are transcoders: name "
                                   "the hook they reconstruct (hook_out, e.g. "
                                   "blocks.6.hook_mlp_out)")
        # an architecture's own field: searched only if some drawn architecture has it; a
        # fixed one only if every drawn architecture has it (the trainer would refuse it)
        for name in set(space) | set(self.sae):
            owners = cat.owners(name)
            if not owners:
                continue
            drawn = [a for a in archs if a in owners]
            where = f"search_space.{name}" if name in space else f"sae.{name}"
            self._require(bool(drawn), where,
                          f"only applies to architecture(s) {', '.join(owners)}, which this sweep "
                          f"never uses (it uses {', '.join(archs)})")
            if name in self.sae:
                missing = [a for a in archs if a not in owners]
                self._require(not missing, where,
                              f"is fixed but architecture(s) {', '.join(missing)} have no such "
                              "field; search it instead (it is then drawn only for the "
                              "architectures that have it)")
            if name in space:
                self._require(all(name in cat.searchable[a] for a in drawn), where,
                              "is not a searchable (numeric) field")
        capped = {f for a in archs for f in cat.width_capped[a]}
        for name in sorted({"d_sae", "n_batches_to_dead"} | capped):
            if name in space:
                spec = space[name]
                self._require(spec.type in ("int", "categorical"), f"search_space.{name}",
                              f"must be int or categorical, got {spec.type}")
                lo, _ = spec.values_bounds()
                self._require(lo >= 1, f"search_space.{name}", f"values must be >= 1, got {lo}")
        if "expansion_factor" in space:
            lo, _ = space["expansion_factor"].values_bounds()
            self._require(lo > 0, "search_space.expansion_factor", f"must be > 0, got {lo}")
        # a width-capped field (top_k < d_sae) must be satisfiable for every width
        if "d_sae" in (set(space) | set(self.sae)):
            smallest_d_sae = (space["d_sae"].values_bounds()[0] if "d_sae" in space
                              else self.sae["d_sae"])
            for a in archs:
                for name, offset in cat.width_capped[a].items():
                    if name not in space:
                        continue
                    spec = space[name]
                    limit = smallest_d_sae - offset
                    if spec.type == "categorical":
                        self._require(max(spec.choices) <= limit, f"search_space.{name}",
                                      f"every choice must be <= {limit} (the smallest d_sae "
                                      f"{smallest_d_sae} - {offset}); a categorical cannot "
                                      "shrink per trial (use an int range instead)")
                    else:
                        self._require(spec.low <= limit, f"search_space.{name}",
                                      f"low ({spec.low}) must be <= {limit} (the smallest "
                                      f"d_sae {smallest_d_sae} - {offset})")
        # loss weights must have an effect
        train = self.training
        e2e = bool(train.get("use_end_to_end", False))
        if "logit_kl_weight" in space:
            self._require(e2e and bool(train.get("use_logit_kl", True)), "search_space.logit_kl_weight",
                          "has no effect unless training.use_end_to_end and training.use_logit_kl "
                          "are true")
        if "block_mse_weight" in space:
            self._require(e2e and bool(train.get("use_block_mse", False)),
                          "search_space.block_mse_weight",
                          "has no effect unless training.use_end_to_end and "
                          "training.use_block_mse are true")
        # objective metrics must be ones the trials report
        known = reported_metric_names()
        evaluators = self.training.get("evaluators") or ()
        for name in self.objective.monitored_metrics():
            self._require(name in known, "objective.metric",
                          f"{name!r} is not a reported metric; known: {', '.join(sorted(known))}")
            self._require(name not in cat.end_to_end_metrics or e2e, "objective.metric",
                          f"{name!r} is only computed by end-to-end training; set "
                          "training.use_end_to_end (and a cache with clean logits) or use a "
                          "reconstruction metric such as fvu")
            need = cat.metric_needs_evaluator(name)
            self._require(need is None or name in cat.end_to_end_metrics or need in evaluators,
                          "objective.metric",
                          f"{name!r} is computed by evaluator {need!r}: add it to "
                          f"training.evaluators (e.g. `evaluators: [{need}]`)")
        # objective/scheduler coherence
        if self.scheduler.type != "none":
            asha_metric = self.scheduler.metric or self.objective.metrics[0]
            self._require(asha_metric not in cat.final_only_metrics, "scheduler.metric",
                          f"{asha_metric!r} is computed only at the end of a trial, so ASHA "
                          "cannot compare it between rungs; name another scheduler.metric "
                          "or set scheduler.type: none")
        if self.objective.is_pareto:
            self._require(self.scheduler.type == "none" or self.scheduler.metric is not None,
                          "scheduler.metric", "with a Pareto objective, name ASHA's metric")
        else:
            self._require(self.sampler != "nsgaii", "sampler",
                          "nsgaii is for Pareto (multi-metric) objectives; use tpe")

    # -- derived settings ------------------------------------------------------------------
    @property
    def is_suite(self) -> bool:
        """Several hooks (``hooks``), each searched on its own (:mod:`sweep.suite`)."""
        return self.hooks is not None

    @property
    def experiment_path(self) -> Path:
        return Path(self.experiment_dir).expanduser().resolve()

    def optuna_storage_url(self) -> str:
        if self.optuna_storage:
            return self.optuna_storage
        return f"sqlite:///{self.experiment_path / 'optuna.db'}"

    def startup_trials(self) -> int:
        if self.n_startup_trials is not None:
            return self.n_startup_trials
        return max(2, min(10, self.num_samples // 3))

    def scheduler_metric_mode(self) -> tuple[str, str]:
        metric = self.scheduler.metric or self.objective.metrics[0]
        if self.scheduler.mode:
            return metric, self.scheduler.mode
        if metric in self.objective.metrics:
            return metric, self.objective.modes[self.objective.metrics.index(metric)]
        raise ConfigError(f"SweepConfig.scheduler.mode: give a mode for metric {metric!r}")


# -- helpers ---------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def catalog() -> Any:
    """What the trainer says about architectures, fields and metrics
    (``trainer.field_catalog()``)."""
    import trainer

    return trainer.field_catalog()


def reported_metric_names() -> frozenset[str]:
    """Metrics a trial reports: the trainer's numeric MetricsRecord fields (``l0`` is the
    shipped encoder's) with ``lr`` and ``elapsed_s`` under the names the sweep reports them
    (``lr_current``, ``train_seconds``; see sweep.trainable)."""
    names = set(catalog().metrics) - set(RENAMED_METRICS)
    return frozenset(names | set(RENAMED_METRICS.values()))


RENAMED_METRICS = {"lr": "lr_current", "elapsed_s": "train_seconds"}
"""MetricsRecord fields a trial reports under another name (``lr`` would clash with the ``lr``
hyperparameter column)."""


def sae_field_names() -> frozenset[str]:
    """Common SAEConfig fields plus every registered architecture's own fields."""
    return catalog().sae_fields


def training_field_names() -> frozenset[str]:
    return frozenset(catalog().training_fields)


def searchable_names() -> frozenset[str]:
    return catalog().searchable_fields


def param_target(name: str) -> str:
    """``"sae"`` or ``"training"``: which config a searched field belongs to."""
    return catalog().config_of(name) or "training"
