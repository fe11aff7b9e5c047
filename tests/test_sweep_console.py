"""What a sweep prints and keeps: the console's format, the results of trials a killed driver
lost, the repair of restored checkpoint bookkeeping, the end-of-sweep summary; and (slow) the
console of a real 4-trial sweep, quiet by default and detailed with --verbose."""

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import yaml

from sweep import summarize_sweep
from sweep.console import ConsoleFormatter, ConsoleSettings, use_colour
from sweep.live_view import ConsoleCallback, progress_line
from sweep.results import TrialRow, load_history, load_results, write_results, write_table
from sweep.results_callback import ResultsCallback
from sweep.searcher import INTERRUPTED_FILE, SweepSearcher, read_interrupted
from sweep.tune_output import forget_missing_checkpoints
from sweep_helpers import build_tiny_cache, tiny_sweep

ROOT = Path(__file__).resolve().parents[1]
SAE_SWEEP = str(Path(sys.executable).with_name("sae-sweep"))
ANSI = re.compile(r"\x1b\[")


# -- format ------------------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(name: str, message: str, style=None) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)
    if style:
        record.style = style
    return record


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    line = _record("sweep.console", "[0:05] trial abc completed: fvu 0.5", "green")
    assert ConsoleFormatter(io.StringIO()).format(line) == "[0:05] trial abc completed: fvu 0.5"
    assert ConsoleFormatter(_Tty()).format(line) == "\x1b[32m[0:05] trial abc completed: fvu 0.5\x1b[0m"
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(_Tty()) and not ANSI.search(ConsoleFormatter(_Tty()).format(line))
    # lines of the other sweep loggers say where they come from
    assert ConsoleFormatter(None).format(_record("sweep", "resuming")) == "sae-sweep: resuming"


def _trial(tid, status, result=None, config=None):
    return SimpleNamespace(trial_id=tid, status=status, last_result=result or {},
                           config=config or {})


def test_progress_line_counts_trials_and_names_the_best_feasible_one():
    settings = ConsoleSettings(num_samples=6, metrics=["fvu", "l0"], modes=["min"],
                               constraints=[{"metric": "l0", "max": 32.0, "min": None}])
    trials = [
        _trial("a", "TERMINATED", {"fvu": 0.30, "l0": 20.0, "final": True}),
        _trial("b", "TERMINATED", {"fvu": 0.10, "l0": 50.0, "final": True}),   # infeasible
        _trial("c", "TERMINATED", {"error": "TrialDiverged: diverged", "fvu": float("nan")}),
        _trial("d", "RUNNING", {"fvu": 0.20, "l0": 10.0}),
        _trial("e", "RUNNING", {"fvu": 0.25, "l0": 12.0, "final": True}),  # just completed
    ]
    line = progress_line(trials, settings, {"e": "completed"})
    assert line == ("4/6 done (3 completed, 1 failed), 1 running, 1 pending"
                    " | best val fvu 0.25 (trial e)")


def test_live_view_lines(caplog):
    settings = ConsoleSettings(num_samples=2, metrics=["fvu", "l0"], modes=["min"])
    cb = ConsoleCallback(settings)
    cb.setup()
    cb.on_step_begin(0, [])
    trial = _trial("t1", "RUNNING", config={"d_sae": 256, "top_k": 9, "lr": 0.0003})
    trial.checkpoint = None
    trial.run_metadata = SimpleNamespace(num_failures=0, checkpoint_manager=None)
    with caplog.at_level(logging.INFO, logger="sweep.console"):
        cb.on_trial_start(0, [trial], trial)
        cb.on_trial_result(0, [trial], trial, {"step": 4, "fvu": 0.8, "l0": 12.5,
                                               "tokens_seen": 1024, "tokens_per_s": 2048.0})
        cb.on_trial_result(0, [trial], trial, {"step": 8, "fvu": 0.7, "l0": 11.0})  # throttled
        trial.last_result = {"step": 16, "fvu": 0.5, "l0": 9.0, "final": True,
                             "tokens_seen": 4096, "train_seconds": 3.21}
        cb.on_trial_complete(0, [trial], trial)
    lines = [re.sub(r"^\[\d+:\d\d\] ", "", r.getMessage()) for r in caplog.records]
    assert lines == [
        "trial t1 started: d_sae=256 top_k=9 lr=0.0003",
        "trial t1 step 4: val fvu 0.8, l0 12.5 (1,024 tokens, 2,048 tok/s)",
        "trial t1 completed: val fvu 0.5, l0 9 (16 steps, 4,096 tokens, 3.2 s)",
        "1/2 done (1 completed), 0 running, 1 pending | best val fvu 0.5 (trial t1)",
    ]


# -- what a killed driver lost -----------------------------------------------------------------


def _space(trial):
    trial.suggest_float("x", 0.0, 1.0)


def test_searcher_requeues_a_trial_lost_with_the_driver_and_records_it(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    s = SweepSearcher(space=_space, metric="fvu", mode="min", storage=storage, study_name="t",
                      sampler=optuna.samplers.RandomSampler(seed=0), record_dir=str(tmp_path))
    s.suggest("a")
    assert s._ot_trials["a"].user_attrs["ray_trial_id"] == "a"   # tagged when handed out
    # a previous driver handed out a trial that Ray never saved
    lost = s._ot_study.ask()
    x = lost.suggest_float("x", 0.0, 1.0)
    lost.set_user_attr("ray_trial_id", "lost1")
    assert s.fail_orphans() == 1
    assert read_interrupted(tmp_path) == [{"trial_id": "lost1", "optuna_trial": lost.number,
                                           "params": {"x": x}, "requeued": True,
                                           "rerun_as": None}]
    assert s.suggest("b") == {"x": x}                        # the next trial re-runs it
    assert read_interrupted(tmp_path)[0]["rerun_as"] == "b"
    states = {t.number: t.state.name for t in s._ot_study.get_trials(deepcopy=False)}
    assert states[lost.number] == "FAIL"


def test_results_keep_every_trial_tune_no_longer_knows(tmp_path):
    write_results([
        TrialRow("done1", "completed", params={"d_sae": 256}, metrics={"fvu": 0.3}, step=16,
                 final=True),
        TrialRow("run1", "running", params={"d_sae": 128}, metrics={"fvu": 0.6}, step=8),
    ], tmp_path)
    write_table(pd.DataFrame([{"trial_id": "run1", "step": 4, "fvu": 0.7},
                              {"trial_id": "run1", "step": 8, "fvu": 0.6}]),
                tmp_path / "history.parquet")
    (tmp_path / INTERRUPTED_FILE).write_text(json.dumps([
        {"trial_id": "run1", "optuna_trial": 1, "params": {"d_sae": 128}, "requeued": True,
         "rerun_as": "new1"},
        {"trial_id": "gone", "optuna_trial": 2, "params": {"d_sae": 512}, "requeued": True,
         "rerun_as": None},
    ]))
    ResultsCallback(tmp_path).flush([])   # the restored Tune knows none of them
    rows = load_results(tmp_path).set_index("trial_id")
    assert list(rows.index) == ["done1", "run1", "gone"]
    assert rows.loc["done1", "status"] == "completed" and rows.loc["done1", "fvu"] == 0.3
    assert rows.loc["run1", "status"] == "interrupted" and rows.loc["run1", "fvu"] == 0.6
    assert rows.loc["run1", "error"] == ("interrupted: the driver stopped before Ray Tune saved "
                                         "this trial (at step 8); its hyperparameters re-ran as "
                                         "trial new1")
    assert rows.loc["gone", "status"] == "interrupted" and rows.loc["gone", "d_sae"] == 512
    assert "before its first report" in rows.loc["gone", "error"]
    assert rows.loc["gone", "error"].endswith("its hyperparameters are queued to run again")
    assert list(load_history(tmp_path)["step"]) == [4, 8]      # its history stays too


def test_checkpoints_deleted_before_a_driver_restart_are_forgotten(tmp_path):
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult

    def result(i):
        folder = tmp_path / f"checkpoint_{i:06d}"
        folder.mkdir()
        return _TrainingResult(checkpoint=Checkpoint.from_directory(str(folder)), metrics={})

    restored = []
    for _ in range(2):  # the bookkeeping a restarted driver restores, twice
        manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
        manager.register_checkpoint(result(0))
        manager.register_checkpoint(result(1))
        (tmp_path / "checkpoint_000000").rmdir()   # the dead driver had deleted it already
        (tmp_path / "checkpoint_000001").rmdir()
        restored.append(manager)
    for name in ("checkpoint_000000", "checkpoint_000001"):
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "checkpoint_000000").rmdir()
    with pytest.raises(FileNotFoundError):      # Tune's "Error handling checkpoint"
        restored[0].register_checkpoint(result(2))
    (tmp_path / "checkpoint_000002").rmdir()
    trial = SimpleNamespace(run_metadata=SimpleNamespace(checkpoint_manager=restored[1]))
    assert forget_missing_checkpoints(trial) == [str(tmp_path / "checkpoint_000000")]
    restored[1].register_checkpoint(result(2))  # no error now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000001",
                                                          "checkpoint_000002"]
    assert forget_missing_checkpoints(SimpleNamespace()) == []   # nothing to repair


def test_summary_names_the_best_trials_and_the_next_commands(tmp_path, monkeypatch):
    exp = tmp_path / "my sweep"
    write_results([TrialRow("a", "completed", params={"top_k": 8},
                            metrics={"fvu": 0.3, "l0": 8.0, "test_fvu": 0.31, "test_l0": 8.5}),
                   TrialRow("b", "completed", params={"top_k": 64}, metrics={"fvu": 0.1, "l0": 64.0}),
                   TrialRow("c", "failed", error="TrialDiverged: diverged")], exp)
    (exp / "sweep.json").write_text(json.dumps({"config": {"objective": {
        "metric": "fvu", "mode": "min", "constraints": [{"metric": "l0", "max": 32.0}]},
        "search_space": {"top_k": {}}}}))
    monkeypatch.chdir(tmp_path)      # paths are shown relative to the working directory
    text = summarize_sweep(exp)
    lines = text.splitlines()
    assert lines[:3] == ["results: 'my sweep/results.parquet' (3 trials: 2 completed, 1 failed)",
                         "Ray's log: 'my sweep/sweep.log'",
                         "2 of 2 completed trials, ranked on validation fvu (min), meeting "
                         "l0 <= 32 first:"]
    assert [ln.split()[:3] for ln in lines[4:6]] == [["a", "yes", "0.3"], ["b", "no", "0.1"]]
    assert ("best trial a (what `export --trial best` ships): val fvu 0.3, l0 8; test fvu 0.31, "
            "l0 8.5") in lines
    assert lines[-5:] == [
        "next:",
        "  sae-sweep best 'my sweep' --top 10",
        "  sae-sweep export 'my sweep' --trial best --out 'my sweep/best-sae'",
        "  sae-sweep report 'my sweep'",
        "  optuna-dashboard 'sqlite:///my sweep/optuna.db'   # pip install optuna-dashboard",
    ]
    assert max(map(len, lines)) <= 120
    stopped = summarize_sweep(exp, interrupted=True,
                              resume_command="sae-sweep sweep --resume 'my sweep'")
    assert stopped.splitlines()[-5] == ("  sae-sweep sweep --resume 'my sweep'   # continue the "
                                        "interrupted sweep")


# -- a real sweep's console (slow) ----------------------------------------------------------------


def _session_processes(sid):
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
    return [int(p) for p, s, st in (ln.split() for ln in out.splitlines())
            if int(s) == sid and not st.startswith("Z")]


def _sweep_cli(args, cwd):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TQDM_DISABLE="1")
    proc = subprocess.Popen([SAE_SWEEP, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    time.sleep(2)
    assert _session_processes(proc.pid) == []    # the local Ray it started is gone
    return output


@pytest.mark.slow
def test_a_four_trial_sweep_console_is_short_and_plain_and_verbose_restores_ray(tmp_path):
    cache = build_tiny_cache(tmp_path / "cache")
    for name in ("quiet", "verbose"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
            tiny_sweep(cache, tmp_path / name, num_samples=4)))
    quiet = _sweep_cli(["sweep", str(tmp_path / "quiet.yaml")], ROOT)
    lines = quiet.splitlines()
    assert 20 <= len(lines) <= 60, quiet
    assert not ANSI.search(quiet)
    for noise in ("╭", "Trial status", "INFO", "WARNING", "pid=", "Checkpoint successfully"):
        assert noise not in quiet, noise
    assert sum("started: d_sae=" in ln for ln in lines) == 4
    assert sum(" completed: val fvu " in ln for ln in lines) == 4
    assert "4/4 done (4 completed), 0 running, 0 pending | best val fvu" in quiet
    assert lines[-5] == "next:" and lines[-1].startswith("  optuna-dashboard sqlite:///")
    log = (tmp_path / "quiet" / "sweep.log").read_text()
    assert "Started a local Ray instance" in log and "Tune status" in log and "pid=" in log

    verbose = _sweep_cli(["sweep", str(tmp_path / "verbose.yaml"), "--verbose"], ROOT)
    assert "╭" in verbose and "Trial status" in verbose and "pid=" in verbose
    assert "started: d_sae=" in verbose and not ANSI.search(verbose)   # not a terminal


def test_the_sweep_package_has_no_import_circle():
    """Module-level and deferred (in-function) relative imports alike: the console and the live
    view used to import each other (the live view's Ray plumbing now lives in tune_output)."""
    import ast

    package = ROOT / "sweep"
    modules = {p.stem for p in package.glob("*.py")}
    graph = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[path.stem] = deps & modules

    def reaches(start, goal, seen):
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m}))
                   for m in graph[start])

    circles = sorted(m for m in graph if reaches(m, m, {m}))
    assert circles == []
    assert not graph["console"] & {"live_view", "tune_output"}
