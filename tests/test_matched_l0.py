"""Issue 19 item 3: an architecture sweep under ``l0 <= 48`` can give every architecture a trial
inside the constraint, without collapse: the k-sparse ones through ``top_k``, ReLU+L1 and
JumpReLU through ``target_l0`` (each architecture's own rule, no branch in the loop)."""

from __future__ import annotations

import pytest

from sweep.sweep_config import SweepConfig
from sweep.trial_configs import build_trial_configs
from tests.sweep_helpers import HOOK, build_tiny_cache, tiny_sweep

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")
L0_MAX = 48.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("matched") / "cache", max_tokens=8000)


def test_every_architecture_has_a_trial_inside_l0_48(cache, tmp_path):
    from activation_cache import open_cache
    from trainer import build_sae, field_catalog, job_sources, train_sae

    data = tiny_sweep(cache, tmp_path / "exp", tokens_per_trial=16384)
    data["sae"] = {"d_sae": 256}
    data["search_space"] = {
        "architecture": {"type": "categorical", "choices": list(ARCHITECTURES)},
        "top_k": {"type": "int", "low": 24, "high": 40},
        "target_l0": {"type": "float", "low": 24.0, "high": 40.0},
    }
    data["objective"] = {"metric": "fvu", "mode": "min",
                         "constraints": [{"metric": "l0", "max": L0_MAX}]}
    cfg = SweepConfig.from_dict(data)
    catalog = field_catalog()
    reader = open_cache(cache)
    figures = {}
    for arch in ARCHITECTURES:
        # the trial an Optuna draw of (architecture, its own field at 32) would run
        params = {"architecture": arch}
        for field in ("top_k", "target_l0"):
            if arch in catalog.owners(field):
                params[field] = 32 if field == "top_k" else 32.0
        sae_cfg, train_cfg = build_trial_configs(cfg, params, reader.d_in(HOOK))
        s = job_sources(reader, train_cfg, HOOK, train_split="train", val_split="val",
                        test_split=None)
        result = train_sae(build_sae(sae_cfg, seed=0), s.train, train_cfg, val_source=s.val,
                           objective=s.objective, reporter=_Quiet())
        figures[arch] = (result.final.l0, result.final.fvu, result.final.dead_fraction)
    for arch, (l0, fvu, dead) in figures.items():
        # inside the constraint, and not collapsed: near the aimed L0, reconstructing, alive
        assert 16.0 <= l0 <= L0_MAX, (arch, figures)
        assert fvu < 0.9 and dead < 0.5, (arch, figures)


class _Quiet:
    def __getattr__(self, name):
        return lambda *a, **k: None
