"""Per-trial resources on a simulated cluster: fractional GPUs pack trials on a GPU, each trial
sees only its GPU and sets torch's threads from its CPUs. Ray is told the node has one GPU
(``num_gpus=1``); no real GPU is needed for Ray's bookkeeping, which is what is tested here."""

import json
import time
from pathlib import Path

import pytest
import ray
import torch
from ray import tune

from sweep import SweepConfig
from sweep.driver import with_trial_resources
from sweep.trainable import configure_trial_resources
from sweep_helpers import tiny_sweep


@pytest.fixture(scope="module")
def one_gpu_node():
    ray.init(num_cpus=10, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def sweep_cfg(tmp_path, resources):
    return SweepConfig.from_dict(tiny_sweep(str(tmp_path / "unused"), tmp_path / "exp",
                                            resources_per_trial=resources))


def run_probes(tmp_path, cfg, num_trials, wait_for):
    """Run ``num_trials`` probe trials with the driver's resource reservation. Each probe sets
    itself up as a sweep trial does, records what it got, then waits until ``wait_for`` probes
    have started (or 60 s) and holds its resources 0.5 s more."""
    out = tmp_path / "probes"
    out.mkdir()
    resources = cfg.resources_per_trial

    def probe(config):
        got = configure_trial_resources(resources)
        start = time.time()
        trial = tune.get_context().get_trial_id()
        (out / f"start-{trial}").write_text("")
        while len(list(out.glob("start-*"))) < wait_for and time.time() < start + 60:
            time.sleep(0.05)
        time.sleep(0.5)
        got.update(start=start, end=time.time(), torch_threads=torch.get_num_threads())
        (out / f"trial-{trial}.json").write_text(json.dumps(got))
        return {"done": 1}

    tuner = tune.Tuner(with_trial_resources(probe, cfg),
                       tune_config=tune.TuneConfig(num_samples=num_trials,
                                                   max_concurrent_trials=num_trials),
                       run_config=tune.RunConfig(name="probes", storage_path=str(tmp_path / "t"),
                                                 verbose=0))
    results = tuner.fit()
    assert not results.errors
    return [json.loads(p.read_text()) for p in sorted(out.glob("trial-*.json"))]


def most_at_once(trials):
    return max(sum(t["start"] <= s["start"] < t["end"] for t in trials) for s in trials)


def test_quarter_gpus_pack_four_trials_on_a_gpu_and_a_fifth_waits(tmp_path, one_gpu_node):
    cfg = sweep_cfg(tmp_path, {"cpu": 2, "gpu": 0.25})
    trials = run_probes(tmp_path, cfg, num_trials=5, wait_for=4)
    assert len(trials) == 5
    assert most_at_once(trials) == 4
    first_four = sorted(trials, key=lambda t: t["start"])[:4]
    fifth = max(trials, key=lambda t: t["start"])
    assert fifth["start"] >= min(t["end"] for t in first_four) - 0.05  # after a slot freed
    for t in trials:
        assert t["assigned"]["GPU"] == pytest.approx(0.25) and t["gpus"] == pytest.approx(0.25)
        assert t["cuda_visible_devices"] == "0"  # all four share the node's one GPU
        # torch's threads are the trial's CPU allotment
        assert t["assigned"]["CPU"] == 2 and t["threads"] == 2 and t["torch_threads"] == 2


def test_a_trial_without_a_gpu_sees_none(tmp_path, one_gpu_node):
    trials = run_probes(tmp_path, sweep_cfg(tmp_path, {"cpu": 3}), num_trials=1, wait_for=1)
    assert trials[0]["gpus"] == 0 and trials[0]["cuda_visible_devices"] == ""
    assert trials[0]["assigned"]["CPU"] == 3 and trials[0]["torch_threads"] == 3


def test_threads_follow_the_assigned_cpus(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    resources = sweep_cfg(Path("unused"), {"cpu": 1.5}).resources_per_trial
    try:
        # outside Ray: the configured CPUs (floored, at least 1); the environment is left alone
        got = configure_trial_resources(resources, assigned={})
        assert got["threads"] == torch.get_num_threads() == 1
        assert got["cuda_visible_devices"] == "0,1"
        # in a worker: what Ray assigned wins; no GPU assigned -> no GPU visible
        got = configure_trial_resources(resources, assigned={"CPU": 3.0})
        assert got["threads"] == torch.get_num_threads() == 3 and got["gpus"] == 0
        assert got["cuda_visible_devices"] == ""
        got = configure_trial_resources(resources, assigned={"CPU": 0.5, "GPU": 0.5})
        assert got["threads"] == torch.get_num_threads() == 1 and got["gpus"] == 0.5
    finally:
        torch.set_num_threads(before)
