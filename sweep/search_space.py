"""The define-by-run search space: Optuna asks for one value at a time, in dependency order.

Constraints between fields are enforced while sampling, so no trial is ever proposed that the
trainer would reject (Ray's OptunaSearch cannot express them in a static space, and failing
trials would teach TPE nothing):

* ``architecture`` is drawn first; a field that an architecture owns (the trainer says which:
  ``trainer.field_catalog()``) is drawn only when the drawn architecture has it, so it never
  appears in another architecture's trial parameters (its column in the results table is null
  there, not a default that looks real);
* the width next (``d_sae``, or ``expansion_factor`` -> ``d_sae = round(ef * d_in)``);
* the fields the architecture caps by the width (the catalog's ``width_capped``, e.g.
  ``top_k`` < d_sae, ``top_k_aux`` <= d_sae) are drawn from ``[low, min(high, d_sae - offset)]``:
  the range shrinks with the width of this trial.

:class:`SearchSpace` is a plain picklable object (Ray pickles the searcher with it).
"""

from __future__ import annotations

from typing import Any

from .sweep_config import ParamSpec, SweepConfig, catalog


class SearchSpace:
    """Callable define-by-run space for ``OptunaSearch(space=...)``.

    ``space(trial)`` suggests every searched field through ``trial.suggest_*`` and returns the
    derived constants (``d_sae`` when the width comes from ``expansion_factor``)."""

    def __init__(self, cfg: SweepConfig, d_in: int):
        cat = catalog()
        self.params: dict[str, ParamSpec] = dict(cfg.search_space)
        archs = cfg.architectures()
        self.fixed_architecture: str = archs[0]
        self.fixed_d_sae: int | None = cfg.sae.get("d_sae")
        self.d_in = int(d_in)
        # what the trainer says, as plain data (the space is pickled to Ray workers)
        self.owned: dict[str, set[str]] = {a: set(cat.owned[a]) for a in archs}
        self.all_owned: set[str] = set(cat.architecture_fields)
        self.capped: dict[str, dict[str, int]] = {a: dict(cat.width_capped[a]) for a in archs}

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
            if name in self.all_owned and name not in self.owned[arch]:
                continue  # another architecture's field
            if name in self.capped[arch]:
                spec = _capped(spec, d_sae - self.capped[arch][name])
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
