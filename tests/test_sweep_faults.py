"""Fault tolerance and multi-node placement (slow: each test runs real sweeps on real Ray).

* a trial's worker process is SIGKILLed mid-training: Tune retries it from its last checkpoint
  and its final row and metrics equal those of an uninterrupted run;
* the driver (`sae-sweep sweep` in a subprocess) is SIGKILLed mid-sweep: `sae-sweep sweep
  --resume` finishes it with the same number of trials, none run twice, a complete table, and
  no ERROR line or traceback in its output or log -- even when the dead driver had deleted a
  checkpoint that Tune's saved state still lists; the resumed driver leaves no Ray process;
* the driver is SIGKILLed after a trial started but before Tune saved it: after `--resume` that
  trial is in results.parquet as `interrupted`, naming the trial that re-ran its hyperparameters;
* a simulated two-node cluster (ray.cluster_utils.Cluster, nodes with their own custom
  resources) runs trials on both nodes, reading the same cache.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
import yaml

from sweep import SweepConfig, load_history, load_results, run_sweep
from sweep_helpers import build_tiny_cache, tiny_sweep

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAE_SWEEP = str(Path(sys.executable).with_name("sae-sweep"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("cache") / "tiny")


def _long_trials(cache, exp, **overrides):
    """Trials of ~100 steps (a few seconds each) with a checkpoint every 10 steps."""
    data = tiny_sweep(cache, exp, tokens_per_trial=100 * 1024, **overrides)
    data["training"].update(train_batch_tokens=1024, log_freq=10, checkpoint_every=10,
                            eval_max_tokens=512)
    return data


def _fixed_space():
    return {"d_sae": {"type": "categorical", "choices": [2048]},
            "top_k": {"type": "categorical", "choices": [8]}}


def _kill_trial_worker_after_checkpoint(tune_dir: Path, killed: dict, stop: threading.Event):
    """Watch the trials' result.json; SIGKILL the trial's process once it has reported a
    checkpoint but is not finished."""
    while not stop.is_set():
        for result_file in tune_dir.glob("*/result.json"):
            lines = [json.loads(ln) for ln in result_file.read_text().splitlines() if ln.strip()]
            with_ckpt = [r for r in lines if r.get("checkpoint_dir_name")]
            if with_ckpt and not lines[-1].get("final") and lines[-1]["step"] < 60:
                killed.update(pid=lines[-1]["pid"], step=lines[-1]["step"])
                os.kill(lines[-1]["pid"], signal.SIGKILL)
                return
        time.sleep(0.05)


def test_sigkill_of_a_trial_worker_resumes_from_its_checkpoint(cache, tmp_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ref = run_sweep(SweepConfig.from_dict(_long_trials(
            cache, tmp_path / "reference", search_space=_fixed_space(), num_samples=1,
            max_concurrent_trials=1)))
        cfg = SweepConfig.from_dict(_long_trials(
            cache, tmp_path / "killed", search_space=_fixed_space(), num_samples=1,
            max_concurrent_trials=1, max_failures=2))
        killed: dict = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_kill_trial_worker_after_checkpoint,
                                   args=(cfg.experiment_path / "tune", killed, stop), daemon=True)
        watcher.start()
        results = run_sweep(cfg)
        stop.set()
    finally:
        ray.shutdown()
    assert killed, "the trial finished before it could be killed"
    row = results.iloc[0]
    assert row["status"] == "completed" and row["final"] and row["num_failures"] == 1
    assert row["tokens_seen"] == ref.iloc[0]["tokens_seen"]
    assert row["step"] == 100 and row["tokens_seen"] > 0.8 * 100 * 1024
    # resumed bit-for-bit: the same final metrics as the run that was never interrupted
    for metric in ("fvu", "l0", "mse", "dead_fraction"):
        assert row[metric] == pytest.approx(ref.iloc[0][metric], rel=1e-6, abs=1e-9), metric
    steps = list(load_history(cfg.experiment_path)["step"])
    assert steps == list(range(10, 101, 10))      # every step once, as if nothing happened


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _completed(exp: Path) -> int:
    try:
        return int((pd.read_parquet(exp / "results.parquet")["status"] == "completed").sum())
    except (OSError, ValueError, KeyError):
        return 0


def _saved_state(tune_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """Per trial id, what Tune's newest saved experiment state holds: (status, the checkpoint
    paths its checkpoint bookkeeping lists). Read the way Ray 2.60 writes it."""
    files = sorted(tune_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (OSError, ValueError):
        return {}
    state = {}
    for trial_json, meta_json in data["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        manager = pickle.loads(bytes.fromhex(meta["checkpoint_manager"]["value"]))
        state[trial["trial_id"]] = (trial["status"],
                                    [r.checkpoint.path for r in manager._checkpoint_results])
    return state


def _session_processes(sid: int) -> list[int]:
    """PIDs of the processes of session ``sid`` (a driver started with start_new_session and
    every Ray process it started)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s, stat in (ln.split() for ln in out.splitlines())
            if int(s) == sid and not stat.startswith("Z")]


def _kill_session(sid: int) -> None:
    for pid in _session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _log_of_last_run(exp: Path) -> str:
    return (exp / "sweep.log").read_text().rsplit("---- sae-sweep", 1)[-1]


def _assert_quiet_success(run: subprocess.CompletedProcess, exp: Path) -> None:
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    for text in (output, _log_of_last_run(exp)):
        assert "ERROR" not in text and "Traceback" not in text, text[-3000:]


def test_sigkill_of_the_driver_then_resume_finishes_the_sweep(cache, tmp_path):
    exp = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    data = _long_trials(cache, exp, num_samples=4, max_concurrent_trials=2)
    config.write_text(yaml.safe_dump(data))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TQDM_DISABLE="1")
    driver = subprocess.Popen([SAE_SWEEP, "sweep", str(config)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)

    def unfinished_with_two_checkpoints() -> list[str]:
        """Running trials whose saved state lists two checkpoints, far from their end."""
        try:
            steps = pd.read_parquet(exp / "results.parquet").set_index("trial_id")["step"]
        except (OSError, ValueError, KeyError):
            return []
        return [tid for tid, (status, paths) in _saved_state(exp / "tune").items()
                if status == "RUNNING" and len(paths) >= 2 and steps.get(tid, 100) <= 60]

    try:
        _wait_for(lambda: _completed(exp) >= 1 and unfinished_with_two_checkpoints(), 240,
                  "a finished trial and a running one with two saved checkpoints")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
        before = load_results(exp)
    finally:
        if driver.poll() is None:
            driver.kill()
    time.sleep(3)  # let the old Ray processes notice their driver is gone
    _kill_session(driver.pid)  # what the README says to do after a killed driver
    finished_before = set(before[before["status"] == "completed"]["trial_id"])
    assert 1 <= len(finished_before) < 4
    # The dead driver may have deleted a trial's oldest checkpoint (checkpoints_to_keep) after
    # registering a newer one, without saving Tune's state again: do that here, deterministically.
    # Tune's restored bookkeeping still lists it; resuming must not log an ERROR over it.
    state = _saved_state(exp / "tune")
    victims = [tid for tid, (status, paths) in state.items()
               if status == "RUNNING" and len(paths) >= 2 and tid not in finished_before]
    assert victims
    for tid in victims:  # (it may be gone already: the dead driver got there first)
        shutil.rmtree(state[tid][1][0], ignore_errors=True)

    resumed = subprocess.Popen([SAE_SWEEP, "sweep", "--resume", str(exp)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    stdout, stderr = resumed.communicate(timeout=480)
    run = subprocess.CompletedProcess(resumed.args, resumed.returncode, stdout, stderr)
    _assert_quiet_success(run, exp)
    assert any(f"trial {tid} resumed from its checkpoint" in stdout + stderr for tid in victims)
    time.sleep(2)
    assert _session_processes(resumed.pid) == []    # a normal exit leaves no Ray process
    results = load_results(exp)
    assert results["trial_id"].is_unique
    interrupted = results[results["status"] == "interrupted"]
    ran = results[results["status"] != "interrupted"]
    assert len(ran) == 4 and (ran["status"] == "completed").all() and ran["final"].all()
    for error in interrupted["error"]:  # a trial Tune had not saved: re-run, and said so
        assert "re-ran as trial" in error and error.rsplit(" ", 1)[-1] in set(ran["trial_id"])
    assert finished_before <= set(ran["trial_id"])
    # no trial ran twice: those finished before the kill keep their results (Tune may replay
    # the last steps of one whose completion it had not saved yet, from its last recorded
    # checkpoint; training resumes bit-for-bit, so the metrics are the same)
    for tid in finished_before:
        old = before.set_index("trial_id").loc[tid]
        new = results.set_index("trial_id").loc[tid]
        for col in ("fvu", "l0", "mse", "tokens_seen", "step"):
            assert new[col] == old[col], (tid, col)
    history = load_history(exp)
    assert set(ran["trial_id"]) <= set(history["trial_id"]) <= set(results["trial_id"])
    assert not history.duplicated(["trial_id", "step"]).any()
    assert (history[history["trial_id"].isin(ran["trial_id"])]
            .groupby("trial_id")["step"].max() == 100).all()
    cfg = SweepConfig.from_dict(data)
    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.optuna_storage_url())
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 4
    assert not [t for t in study.trials if t.state.name == "RUNNING"]


def test_a_trial_lost_with_the_driver_before_its_first_report_is_rerun_and_shown(cache, tmp_path):
    exp = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    data = _long_trials(cache, exp, num_samples=3, max_concurrent_trials=1)
    data["tokens_per_trial"] = 400 * 1024
    data["training"].update(log_freq=200, checkpoint_every=200)  # seconds to a first report
    config.write_text(yaml.safe_dump(data))
    # Tune saves its experiment state every hour only (and when checkpoints force it), so the
    # second trial starts without being saved
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TQDM_DISABLE="1",
               TUNE_GLOBAL_CHECKPOINT_S="3600")
    cfg = SweepConfig.from_dict(data)
    driver = subprocess.Popen([SAE_SWEEP, "sweep", str(config)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)

    def second_trial_handed_out():  # the searcher tags each Optuna trial with its Ray id
        try:
            trials = optuna.load_study(study_name=cfg.study_name,
                                       storage=cfg.optuna_storage_url()).trials
        except Exception:  # the study does not exist yet
            return None
        return trials[1].user_attrs.get("ray_trial_id") if len(trials) > 1 else None

    try:
        deadline = time.monotonic() + 240
        while (lost := second_trial_handed_out()) is None:
            assert time.monotonic() < deadline, "timed out waiting for the second trial"
            time.sleep(0.02)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    reported = load_results(exp)
    reported = reported[reported["step"].notna()]["trial_id"]
    assert lost not in set(reported)            # the driver never had a report from it
    time.sleep(3)
    _kill_session(driver.pid)   # (its worker may have written a checkpoint Tune never saw)
    assert lost not in _saved_state(exp / "tune")   # the situation under test

    resumed = subprocess.run([SAE_SWEEP, "sweep", "--resume", str(exp)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=480)
    _assert_quiet_success(resumed, exp)
    assert f"trial {lost} had started but Ray Tune had not saved it" in resumed.stderr
    results = load_results(exp).set_index("trial_id")
    row = results.loc[lost]
    assert row["status"] == "interrupted"
    assert "before its first report" in row["error"] and "re-ran as trial" in row["error"]
    rerun = row["error"].rsplit(" ", 1)[-1]
    assert results.loc[rerun, "status"] == "completed"
    for param in ("d_sae", "top_k"):             # the same hyperparameters, run again
        assert results.loc[rerun, param] == row[param]
    assert (results["status"] == "completed").sum() == 3 and len(results) == 4
    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.optuna_storage_url())
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3 + ["FAIL"]
    record = json.loads((exp / "interrupted_trials.json").read_text())
    assert [(r["trial_id"], r["rerun_as"]) for r in record] == [(lost, rerun)]


def test_trials_run_on_two_nodes_of_a_simulated_cluster_reading_one_cache(cache, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1, resources={"sae_slot": 1, f"node_{name}": 1})
             for name in ("a", "b")]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cfg = SweepConfig.from_dict(_long_trials(
            cache, tmp_path / "sweep", num_samples=4, max_concurrent_trials=2,
            resources_per_trial={"cpu": 1, "custom": {"sae_slot": 1}}))
        results = run_sweep(cfg)
        worker_ids = {n.node_id for n in nodes}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert (results["status"] == "completed").all() and len(results) == 4
    used = set(results["node_id"])
    assert len(used) == 2 and used <= worker_ids        # both worker nodes, never the head
    assert json.loads((cfg.experiment_path / "sweep.json").read_text())["config"]["cache"] == cache


def test_sigkill_of_a_suite_driver_then_resume_loses_no_trial_and_runs_none_twice(tmp_path):
    """Two hooks, two trials each: kill the driver once a trial finished, resume; every hook
    ends with exactly its num_samples completed trials, and each hook's Optuna study holds
    exactly its own trials."""
    cache = build_tiny_cache(tmp_path / "cache",
                             hooks=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"))
    exp = tmp_path / "suite"
    config = tmp_path / "suite.yaml"
    data = _long_trials(cache, exp, num_samples=2, max_concurrent_trials=2,
                        search_space=_fixed_space())
    data.pop("hook")
    data["hooks"] = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    config.write_text(yaml.safe_dump(data))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TQDM_DISABLE="1")
    driver = subprocess.Popen([SAE_SWEEP, "sweep", str(config)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _wait_for(lambda: _completed(exp) >= 1, 240, "a finished trial")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
        before = load_results(exp)
    finally:
        if driver.poll() is None:
            driver.kill()
    time.sleep(3)
    _kill_session(driver.pid)
    finished_before = set(before[before["status"] == "completed"]["trial_id"])
    assert 1 <= len(finished_before) < 4
    resumed = subprocess.run([SAE_SWEEP, "sweep", "--resume", str(exp)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=480, start_new_session=True)
    _assert_quiet_success(resumed, exp)
    results = load_results(exp)
    assert results["trial_id"].is_unique
    ran = results[results["status"] != "interrupted"]
    assert (ran["status"] == "completed").all() and ran["final"].all()
    assert ran["hook"].value_counts().to_dict() == {h: 2 for h in data["hooks"]}
    for tid in finished_before:  # kept, not re-run
        old = before.set_index("trial_id").loc[tid]
        new = results.set_index("trial_id").loc[tid]
        for col in ("fvu", "l0", "tokens_seen", "step", "hook"):
            assert new[col] == old[col], (tid, col)
    cfg = SweepConfig.from_dict(data)
    for hook in data["hooks"]:
        study = optuna.load_study(study_name=f"{cfg.study_name}.{hook}",
                                  storage=cfg.optuna_storage_url())
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert len(complete) == 2
        assert {t.user_attrs["ray_trial_id"] for t in complete} == set(
            ran[ran["hook"] == hook]["trial_id"])
        assert not [t for t in study.trials if t.state.name == "RUNNING"]
