"""The define-by-run search space: Optuna asks for one value at a time, in dependency order.

Constraints between fields are enforced while sampling, so no trial is ever proposed that the
trainer would reject (Ray's OptunaSearch cannot express them in a static space, and failing
trials would teach TPE nothing):

* ``architecture`` is drawn first; fields that belong to the other architecture are not drawn at
  all (``top_k``/``aux_penalty``/... only for ``batchtopk``, ``l1_coefficient`` only for
  ``standard``), so they never appear in that trial's parameters;
* the width next (``d_sae``, or ``expansion_factor`` -> ``d_sae = round(ef * d_in)``);
* ``top_k`` is drawn from ``[low, min(high, d_sae - 1)]`` and ``top_k_aux`` from
  ``[low, min(high, d_sae)]``: the range shrinks with the width of this trial.

:class:`SearchSpace` is a plain picklable object (Ray pickles the searcher with it).
"""

from __future__ import annotations

from typing import Any

from .sweep_config import BATCHTOPK_ONLY, STANDARD_ONLY, ParamSpec, SweepConfig

# Fields capped by the trial's d_sae: name -> offset (top_k < d_sae, top_k_aux <= d_sae).
_WIDTH_CAPPED = {"top_k": 1, "top_k_aux": 0}


class SearchSpace:
    """Callable define-by-run space for ``OptunaSearch(space=...)``.

    ``space(trial)`` suggests every searched field through ``trial.suggest_*`` and returns the
    derived constants (``d_sae`` when the width comes from ``expansion_factor``)."""

    def __init__(self, cfg: SweepConfig, d_in: int):
        self.params: dict[str, ParamSpec] = dict(cfg.search_space)
        self.fixed_architecture: str = cfg.sae.get("architecture", "batchtopk")
        self.fixed_d_sae: int | None = cfg.sae.get("d_sae")
        self.d_in = int(d_in)

    def __call__(self, trial: Any) -> dict[str, Any]:
        derived: dict[str, Any] = {}
        arch = self.fixed_architecture
        if "architecture" in self.params:
            arch = self._suggest(trial, "architecture", self.params["architecture"])
        if "d_sae" in self.params:
            d_sae = int(self._suggest(trial, "d_sae", self.params["d_sae"]))
        elif "expansion_factor" in self.params:
            ef = self._suggest(trial, "expansion_factor", self.params["expansion_factor"])
            d_sae = max(1, int(round(ef * self.d_in)))
            derived["d_sae"] = d_sae
        else:
            d_sae = int(self.fixed_d_sae)  # validated: fixed when not searched
        for name, spec in self.params.items():
            if name in ("architecture", "d_sae", "expansion_factor"):
                continue
            if name in BATCHTOPK_ONLY and arch != "batchtopk":
                continue
            if name in STANDARD_ONLY and arch != "standard":
                continue
            if name in _WIDTH_CAPPED:
                spec = _capped(spec, d_sae - _WIDTH_CAPPED[name])
            self._suggest(trial, name, spec)
        return derived

    @staticmethod
    def _suggest(trial: Any, name: str, spec: ParamSpec) -> Any:
        if spec.type == "categorical":
            return trial.suggest_categorical(name, list(spec.choices))
        if spec.type == "int":
            return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1),
                                     log=spec.log)
        return trial.suggest_float(name, float(spec.low), float(spec.high), step=spec.step,
                                   log=spec.log)


def _capped(spec: ParamSpec, limit: int) -> ParamSpec:
    """``spec`` with its upper bound lowered to ``limit`` (the range stays aligned to ``step``).

    Configs are validated so that ``low <= limit`` for every width the space can draw."""
    if spec.type == "categorical" or spec.high <= limit:
        return spec
    high = max(int(spec.low), int(limit))
    step = int(spec.step or 1)
    high = int(spec.low) + ((high - int(spec.low)) // step) * step
    return ParamSpec(type="int", low=spec.low, high=high, log=spec.log, step=spec.step)
