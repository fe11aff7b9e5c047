"""The confirm stage inside a real sweep (slow: real Ray, a driver killed and resumed).

The driver (`sae-sweep sweep` in a subprocess) runs a search of 2 trials, then confirms the best
with 3 new seeds; it is SIGKILLed while the confirm stage runs (one replicate completed,
another running). `sae-sweep sweep --resume` then finishes it:

* every planned replicate completed exactly once (no replicate lost, none run twice: the one
  completed before the kill keeps its row and metrics), each with its own seed and
  ``replicate_of`` naming the best search trial;
* the search stage is not run again: Tune's saved search state is untouched, the search rows are
  unchanged and the Optuna study holds exactly the 2 search trials (replicates never reach it);
* `best` ranks configurations with ``mean ± sd`` over the 4 runs, and `export --trial best`
  says which trial and seed it shipped.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from sweep import SweepConfig, load_results
from sweep_helpers import build_tiny_cache
from test_sweep_faults import (_assert_quiet_success, _kill_session, _long_trials,
                               _session_processes, _wait_for)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAE_SWEEP = str(Path(sys.executable).with_name("sae-sweep"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("cache") / "tiny")


def _rows(exp: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(exp / "results.parquet")
    except (OSError, ValueError):
        return pd.DataFrame(columns=["trial_id", "status"])


def _replicates(frame: pd.DataFrame) -> pd.DataFrame:
    if "replicate_of" not in frame:
        return frame.iloc[0:0]
    return frame[frame["replicate_of"].notna()]


def test_confirm_survives_a_driver_kill_and_resume(cache, tmp_path):
    exp = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    data = _long_trials(cache, exp, num_samples=2, max_concurrent_trials=2,
                        confirm={"top": 1, "seeds": 3})
    data["tokens_per_trial"] = 160 * 1024
    config.write_text(yaml.safe_dump(data))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TQDM_DISABLE="1")
    driver = subprocess.Popen([SAE_SWEEP, "sweep", str(config)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)

    def one_replicate_done_another_running() -> bool:
        reps = _replicates(_rows(exp))
        return bool((reps["status"] == "completed").any() and (reps["status"] == "running").any())

    try:
        _wait_for(one_replicate_done_another_running, 400,
                  "a completed replicate and a running one")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    time.sleep(3)
    _kill_session(driver.pid)
    before = load_results(exp)
    plan = json.loads((exp / "confirm.json").read_text())
    search_before = before[before["replicate_of"].isna()].set_index("trial_id")
    assert len(search_before) == 2 and (search_before["status"] == "completed").all()
    done_before = _replicates(before)[_replicates(before)["status"] == "completed"]
    assert 1 <= len(done_before) < 3
    search_state = {p.name: p.read_bytes() for p in (exp / "tune").glob("experiment_state-*")}
    assert search_state

    resumed = subprocess.Popen([SAE_SWEEP, "sweep", "--resume", str(exp)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    stdout, stderr = resumed.communicate(timeout=480)
    run = subprocess.CompletedProcess(resumed.args, resumed.returncode, stdout, stderr)
    _assert_quiet_success(run, exp)
    time.sleep(2)
    assert _session_processes(resumed.pid) == []

    results = load_results(exp)
    assert results["trial_id"].is_unique
    reps = _replicates(results)
    completed = reps[reps["status"] == "completed"]
    best_trial = search_before["fvu"].idxmin()
    assert plan["configurations"] == [best_trial]
    # every planned replicate completed exactly once, with its own seed
    assert sorted(completed["seed"].astype(int)) == [1, 2, 3]
    assert set(completed["replicate_of"]) == {best_trial}
    assert completed["final"].all() and (completed["step"] == 160).all()
    for error in reps[reps["status"] == "interrupted"]["error"]:
        assert "runs this replicate again" in error
    assert set(reps["status"]) <= {"completed", "interrupted"}
    # the replicate completed before the kill was not run again
    for tid, old in done_before.set_index("trial_id").iterrows():
        new = results.set_index("trial_id").loc[tid]
        for col in ("fvu", "l0", "tokens_seen", "step", "seed"):
            assert new[col] == old[col], (tid, col)
    # seeds matter: the replicates differ from the original and from each other
    fvus = [search_before.loc[best_trial, "fvu"], *completed["fvu"]]
    assert len(set(fvus)) == 4
    # the search stage was not run again: its Tune state untouched, its rows unchanged, and
    # the Optuna study holds the 2 search trials only
    assert {p.name: p.read_bytes() for p in (exp / "tune").glob("experiment_state-*")} == \
        search_state
    search_after = results[results["replicate_of"].isna()].set_index("trial_id")
    pd.testing.assert_frame_equal(search_after[["fvu", "l0", "step", "status"]],
                                  search_before[["fvu", "l0", "step", "status"]])
    cfg = SweepConfig.from_dict(data)
    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.optuna_storage_url())
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert "resuming the confirm stage" in stdout + stderr

    # best: configurations on seed means; export: the best mean, and which seed
    best = subprocess.run([SAE_SWEEP, "best", str(exp)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert best.returncode == 0, best.stderr
    assert "configurations (5 completed runs, 3 of them replicates)" in best.stdout
    assert " ± " in best.stdout and best_trial in best.stdout
    export = subprocess.run([SAE_SWEEP, "export", str(exp), "--trial", "best", "--out",
                             str(tmp_path / "best-sae")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    runs = results[(results["trial_id"] == best_trial) | (results["replicate_of"] == best_trial)]
    runs = runs[runs["status"] == "completed"]
    shipped = runs.loc[runs["fvu"].idxmin()]                     # its best seed on val
    assert f"trial {shipped['trial_id']}" in export.stdout + export.stderr
    assert f"configuration {best_trial} has the best mean" in export.stdout + export.stderr
