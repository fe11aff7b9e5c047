"""A sweep whose trials train end to end (KL through the spliced model) and whose objective is
an end-to-end metric, with the KL weight searched (slow: live model passes)."""

import math

import pytest
import ray

from sweep import SweepConfig, run_sweep
from sweep_helpers import build_tiny_cache, tiny_sweep

pytestmark = pytest.mark.slow


def test_end_to_end_sweep_optimises_ce_loss_delta(tmp_path):
    cache = build_tiny_cache(tmp_path / "cache", max_tokens=3000, store_logits=True)
    data = tiny_sweep(cache, tmp_path / "sweep", num_samples=2, tokens_per_trial=1500,
                      objective={"metric": ["ce_loss_delta", "l0"], "mode": ["min", "min"]},
                      sampler="nsgaii")
    data["training"].update(use_end_to_end=True, use_logit_kl=True, batch_size=4, log_freq=4,
                            checkpoint_every=4)
    data["search_space"]["logit_kl_weight"] = {"type": "float", "low": 0.1, "high": 1.0,
                                               "log": True}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = run_sweep(SweepConfig.from_dict(data))
    finally:
        ray.shutdown()
    assert (results["status"] == "completed").all() and len(results) == 2
    for col in ("ce_loss_delta", "kl_div", "ce_loss_score", "logit_kl_weight"):
        assert results[col].map(math.isfinite).all(), col
    assert (results["kl_div"] >= 0).all()
