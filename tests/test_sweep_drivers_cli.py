"""Real drivers on one experiment, and how a sweep ends (slow: real sweeps on local Ray).

* two `sae-sweep sweep` started at the same moment: one runs, the other is refused in one line;
  a `--resume` while the first still runs is refused the same way; nothing is lost (every
  trial completed, once, in results.parquet and in the Optuna study); the winner's output,
  redirected to a file as a cluster job's would be, has no carriage return, no escape code and
  no line over 130 characters, and ends with the per-architecture summary and its warning;
* a sweep stopped with Ctrl-C (SIGINT) says "interrupted" and prints the exact `--resume`
  command; its unfinished trials are `interrupted` (shown apart by `best`), and that command
  finishes the sweep.
"""

import os
import re
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
from sweep_helpers import build_tiny_cache, tiny_sweep

pytestmark = pytest.mark.slow

SAE_SWEEP = str(Path(sys.executable).with_name("sae-sweep"))
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", TQDM_DISABLE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("cache") / "tiny")


def _start(args, cwd, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([SAE_SWEEP, *args], cwd=cwd, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _reported(exp: Path) -> bool:
    try:
        return bool(pd.read_parquet(exp / "results.parquet")["step"].notna().any())
    except (OSError, ValueError, KeyError):
        return False


def _assert_fit_for_a_log_file(text: str) -> None:
    assert "\r" not in text and "\x1b" not in text, text[-2000:]
    assert max(map(len, text.splitlines())) <= 130, max(text.splitlines(), key=len)


def _study(cfg_path: Path, cwd: Path):
    cfg = SweepConfig.from_dict(yaml.safe_load(cfg_path.read_text())
                                | {"experiment_dir": str(cwd / "exp")})
    return optuna.load_study(study_name=cfg.study_name, storage=cfg.optuna_storage_url())


def test_two_drivers_started_together_give_one_sweep_and_lose_nothing(cache, tmp_path):
    data = tiny_sweep(cache, "exp", num_samples=4, tokens_per_trial=24 * 1024,
                      objective={"metric": "fvu", "mode": "min",
                                 "constraints": [{"metric": "l0", "max": 12}]})
    data["search_space"]["architecture"] = {"type": "categorical",
                                            "choices": ["batchtopk", "jumprelu"]}
    data["search_space"]["top_k"] = {"type": "int", "low": 4, "high": 8}
    data["sae"] = {}  # BatchTopK's threshold options are its own: not fixed for both architectures
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(data))
    a = _start(["sweep", "sweep.yaml"], tmp_path, tmp_path / "a.log")
    b = _start(["sweep", "sweep.yaml"], tmp_path, tmp_path / "b.log")
    exp = tmp_path / "exp"
    try:
        first_done = None
        deadline = time.monotonic() + 60
        while first_done is None and time.monotonic() < deadline:
            first_done = next((p for p in (a, b) if p.poll() is not None), None)
            time.sleep(0.05)
        assert first_done is not None and first_done.returncode == 2, "nobody was refused"
        winner = b if first_done is a else a
        refused = (tmp_path / ("a.log" if first_done is a else "b.log")).read_text()
        assert refused.count("\n") == 1 and "Traceback" not in refused, refused
        assert refused.startswith("sae-sweep sweep: error: ")
        assert f"a sweep driver is already running this experiment (host " in refused
        assert f"pid {winner.pid}, since " in refused
        # "continue it with --resume" while the first driver still runs: refused too
        _wait_for(lambda: _reported(exp), 180, "the first report")
        resume = subprocess.run([SAE_SWEEP, "sweep", "--resume", "exp"], cwd=tmp_path, env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert resume.returncode == 2 and resume.stdout == ""
        assert resume.stderr.count("\n") == 1 and f"pid {winner.pid}," in resume.stderr
        assert winner.wait(400) == 0
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    log = (tmp_path / ("b.log" if winner is b else "a.log")).read_text()
    _assert_fit_for_a_log_file(log)
    assert "sae-sweep: sweep exp finished in " in log
    results = load_results(exp)
    assert len(results) == 4 and results["trial_id"].is_unique
    assert (results["status"] == "completed").all(), results[["trial_id", "status"]]
    study = _study(tmp_path / "sweep.yaml", tmp_path)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 4
    assert not (exp / "driver.lock").exists()
    # the closing summary: per architecture when the sweep searched several; a warning for
    # one that never met the constraint
    lines = log.splitlines()
    archs = set(results["architecture"])
    never = [arch for arch in archs
             if not (results[results["architecture"] == arch]["l0"] <= 12).any()]
    if len(archs) > 1:
        block = lines[lines.index("per architecture:") + 1:]
        assert {ln.split(":")[0].strip() for ln in block[:len(archs)]} == archs
    for arch in never:
        assert any(re.fullmatch(rf"sae-sweep: warning: {arch}: \d+ trials?, none met l0 <= 12 "
                                r"\(closest l0 [\d.]+\)", ln) for ln in lines), log
    assert lines[-5] == "next:" and lines[-4] == "  sae-sweep best exp --top 10"


def test_an_interrupted_sweep_says_so_and_prints_the_resume_command(cache, tmp_path):
    data = tiny_sweep(cache, "exp", num_samples=3, max_concurrent_trials=2,
                      tokens_per_trial=120 * 1024)
    data["training"].update(train_batch_tokens=1024, log_freq=10, checkpoint_every=10)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(data))
    exp = tmp_path / "exp"
    driver = _start(["sweep", "sweep.yaml"], tmp_path, tmp_path / "first.log")
    try:
        _wait_for(lambda: _reported(exp), 180, "a first report")
        os.kill(driver.pid, signal.SIGINT)
        assert driver.wait(180) == 130
    finally:
        if driver.poll() is None:
            driver.kill()
    out = (tmp_path / "first.log").read_text()
    _assert_fit_for_a_log_file(out)
    lines = out.splitlines()
    assert any(re.fullmatch(r"sae-sweep: sweep exp interrupted after \d+:\d\d: .*; continue it "
                            r"with: sae-sweep sweep --resume exp", ln) for ln in lines), out
    assert "  sae-sweep sweep --resume exp   # continue the interrupted sweep" in lines
    assert lines[-1] == "sae-sweep sweep: interrupted; continue it with: sae-sweep sweep " \
                        "--resume exp"
    assert "Traceback" not in out and " finished in " not in out
    results = load_results(exp)
    assert "stopped" not in set(results["status"])       # unfinished trials are not "stopped"
    interrupted = results[results["status"] == "interrupted"]
    assert len(interrupted) >= 1
    assert interrupted["error"].str.endswith("sae-sweep sweep --resume continues it").all()
    best = subprocess.run([SAE_SWEEP, "best", "exp"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert best.returncode == 0
    ranked, apart = best.stdout.split("not ranked:", 1)
    for tid in interrupted["trial_id"]:   # shown apart from the ranked ones, never among them
        assert tid not in ranked and tid in apart, best.stdout

    # the printed command finishes the sweep
    again = subprocess.run(["sae-sweep", "sweep", "--resume", "exp"], cwd=tmp_path,
                           env=dict(ENV, PATH=f"{Path(SAE_SWEEP).parent}:{ENV['PATH']}"),
                           capture_output=True, text=True, timeout=480)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    _assert_fit_for_a_log_file(again.stdout + again.stderr)
    results = load_results(exp)
    assert set(results["status"]) == {"completed"} and len(results) == 3
    study = _study(tmp_path / "sweep.yaml", tmp_path)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3
