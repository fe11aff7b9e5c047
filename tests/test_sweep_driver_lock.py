"""One live driver per experiment: the lock (simultaneous starts, refusal, stale and foreign
locks, PID reuse), and results tables that two writers cannot shrink. No Ray here."""

import json
import multiprocessing as mp
import os
import socket
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sweep.driver_lock import (LOCK_FILE, ExperimentLockedError, LockRecord, acquire,
                               liveness, read_lock)
from sweep.results import load_history, load_results
from sweep.results_callback import ResultsCallback
from sweep_helpers import tiny_sweep

FORK = mp.get_context("fork")


def _contender(exp, start, done, results):
    """One driver of a simultaneous start: take the lock at the same moment as the others,
    hold it until every one has tried, then release it."""
    start.wait()
    try:
        lock = acquire(exp)
        results.put(("won", os.getpid(), ""))
    except ExperimentLockedError as exc:
        lock = None
        results.put(("refused", os.getpid(), str(exc)))
    done.wait()
    if lock is not None:
        lock.release()


def _stale_lock(exp: Path) -> None:
    """The lock a SIGKILLed driver leaves behind."""
    exp.mkdir()
    dead = replace(LockRecord.of_this_process(), pid=2 ** 22 + 4321, token="dead")
    (exp / LOCK_FILE).write_text(json.dumps(asdict(dead)))


@pytest.mark.parametrize("stale", [False, True], ids=["fresh-folder", "stale-lock"])
def test_simultaneous_starts_never_give_two_drivers(tmp_path, stale):
    """Two `sae-sweep sweep` at once on a new folder, or two `--resume` at once taking over a
    killed driver's lock: one wins, the others are refused naming it."""
    rounds, drivers = 25, 3
    for n in range(rounds):
        exp = tmp_path / f"exp{n}"
        if stale:
            _stale_lock(exp)
        start, done = FORK.Barrier(drivers), FORK.Barrier(drivers)
        results = FORK.Queue()
        procs = [FORK.Process(target=_contender, args=(exp, start, done, results))
                 for _ in range(drivers)]
        for p in procs:
            p.start()
        outcome = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
        winners = [pid for what, pid, _ in outcome if what == "won"]
        assert len(winners) == 1, outcome
        for what, pid, message in outcome:
            if what == "refused":   # one line naming the running driver
                assert "\n" not in message and f"pid {winners[0]}" in message
                assert f"host {socket.gethostname()}" in message and "since " in message
        assert not (exp / LOCK_FILE).exists()   # released by its winner


def _holder(exp, ready, release, *, leave_stale=False):
    lock = acquire(exp)
    ready.set()
    release.wait(60)
    if leave_stale:
        os._exit(0)       # like a SIGKILL: the lock stays behind
    lock.release()


@pytest.fixture
def running_driver(tmp_path):
    """An experiment folder (sweep.json written) whose lock a live process holds."""
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "sweep.json").write_text(json.dumps({"config": tiny_sweep("c", exp), "d_in": 64,
                                                "tune_path": str(exp / "tune")}))
    ready, release = FORK.Event(), FORK.Event()
    proc = FORK.Process(target=_holder, args=(exp, ready, release))
    proc.start()
    assert ready.wait(30)
    yield exp, proc.pid
    release.set()
    proc.join(30)


def test_a_second_driver_or_resume_is_refused_in_one_line(running_driver, tmp_path, capsys):
    from sweep.cli import main

    exp, pid = running_driver
    before = sorted(p.name for p in exp.iterdir())
    config = tmp_path / "again.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep("no-such-cache", exp)))
    for args in (["sweep", "--resume", str(exp)], ["sweep", str(config)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("sae-sweep sweep: error: ")
        assert f"a sweep driver is already running this experiment (host " \
               f"{socket.gethostname()}, pid {pid}, since " in err
    # the refusal came first: nothing else touched the folder (no optuna.db, sweep.log, tune/)
    assert sorted(p.name for p in exp.iterdir()) == before


def test_a_stale_lock_is_taken_over_on_resume_with_one_line(tmp_path, caplog):
    import logging

    from sweep import resume_sweep
    from sweep.driver import NotAnExperimentError

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "sweep.json").write_text(json.dumps({"config": tiny_sweep("c", exp), "d_in": 64,
                                                "tune_path": str(exp / "tune")}))
    ready, release = FORK.Event(), FORK.Event()
    proc = FORK.Process(target=_holder, args=(exp, ready, release), kwargs={"leave_stale": True})
    proc.start()
    assert ready.wait(30)
    release.set()
    proc.join(30)
    dead = read_lock(exp)
    assert dead is not None and dead.pid == proc.pid and liveness(dead) == "dead"
    with caplog.at_level(logging.INFO, logger="sweep"):
        with pytest.raises(NotAnExperimentError, match="no Ray Tune state"):
            resume_sweep(exp)   # (no Tune state here: it stops right after the lock)
    lines = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert lines == [f"took over {exp / LOCK_FILE} from a driver that is no longer running "
                     f"({dead.describe()})"]
    assert not (exp / LOCK_FILE).exists()   # released again


def test_liveness_guards_pid_reuse_and_cannot_check_another_host(tmp_path):
    me = LockRecord.of_this_process()
    assert liveness(me) == "live"
    assert me.started is not None       # Linux: /proc/PID/stat's start time
    assert liveness(replace(me, started="proc:1")) == "dead"    # same PID, another process
    assert liveness(replace(me, boot_id="another-boot")) == "dead"
    assert liveness(replace(me, pid=2 ** 22 + 12345)) == "dead"
    assert liveness(replace(me, host="elsewhere.example")) == "unknown"

    exp = tmp_path / "exp"
    exp.mkdir()
    foreign = replace(me, host="node-7", token="t0")
    (exp / LOCK_FILE).write_text(json.dumps(asdict(foreign)))
    with pytest.raises(ExperimentLockedError, match=r"another host \(host node-7, pid .*cannot "
                                                   r"be checked from .*--take-over"):
        acquire(exp)
    assert read_lock(exp).token == "t0"            # left alone
    lock = acquire(exp, take_over=True)
    assert lock.replaced == foreign and read_lock(exp).token == lock.record.token
    lock.release()
    assert not (exp / LOCK_FILE).exists()


def test_a_refused_start_leaves_no_folder_behind(tmp_path):
    from activation_cache import ConfigError
    from sweep import SweepConfig, run_sweep

    exp = tmp_path / "new" / "exp"
    with pytest.raises(ConfigError):
        run_sweep(SweepConfig.from_dict(tiny_sweep(str(tmp_path / "no-cache"), exp)))
    assert not exp.exists()


# -- two writers of one results table ------------------------------------------------------------


def _trial(tid, status, **result):
    result.setdefault("step", 8)
    return SimpleNamespace(trial_id=tid, status=status, last_result=result,
                           config={"d_sae": 128, "top_k": 4}, checkpoint=None,
                           run_metadata=SimpleNamespace(num_failures=0), error_file=None,
                           get_error=lambda: None)


def test_a_second_writer_cannot_drop_a_completed_trial(tmp_path):
    """What two drivers did to results.parquet: the second one's callback rewrote the table
    from what it knew, and two of the first one's completed trials vanished."""
    first, second = ResultsCallback(tmp_path), ResultsCallback(tmp_path)
    first.setup()
    second.setup()            # both started on an empty folder
    done = dict(final=True, fvu=0.3, l0=4.0, step=16)
    running = [_trial(tid, "RUNNING") for tid in ("a1", "a2", "a3")]
    for trial in running:
        first.on_trial_result(0, running, trial, {"step": 8, "fvu": 0.5})
    first.flush([_trial("a1", "TERMINATED", **done), _trial("a2", "TERMINATED", **done),
                 _trial("a3", "RUNNING", fvu=0.5)])
    # the second driver knows a3 (restarted from scratch) and a trial of its own
    second.on_trial_result(0, [_trial("b1", "RUNNING")], _trial("b1", "RUNNING"),
                           {"step": 4, "fvu": 0.9})
    second.flush([_trial("a3", "PENDING", step=None), _trial("b1", "RUNNING", fvu=0.9, step=4)])
    rows = load_results(tmp_path).set_index("trial_id")
    assert list(rows.index) == ["a1", "a2", "a3", "b1"]
    assert (rows.loc[["a1", "a2"], "status"] == "completed").all()
    assert rows.loc["a1", "fvu"] == 0.3
    first.flush([_trial("a1", "TERMINATED", **done), _trial("a2", "TERMINATED", **done),
                 _trial("a3", "TERMINATED", **done)])
    second.flush([_trial("a3", "RUNNING", fvu=0.8, step=4), _trial("b1", "RUNNING", fvu=0.9)])
    rows = load_results(tmp_path).set_index("trial_id")
    assert list(rows["status"]) == ["completed"] * 3 + ["running"]   # a3 stays completed
    history = load_history(tmp_path)
    assert set(history["trial_id"]) == {"a1", "a2", "a3", "b1"}      # nobody's history lost


def test_trials_a_ctrl_c_left_unfinished_are_written_as_interrupted(tmp_path):
    watch = SimpleNamespace(interrupted=True, unfinished={"r1", "p1"})
    cb = ResultsCallback(tmp_path, interrupt=watch)
    cb.setup()
    # after Tune's clean-up every trial reads TERMINATED; only r1 and p1 were unfinished
    cb.flush([_trial("c1", "TERMINATED", final=True, fvu=0.3),
              _trial("s1", "TERMINATED", fvu=0.4),               # ASHA stopped it earlier
              _trial("r1", "TERMINATED", fvu=0.6, step=12),
              _trial("p1", "PENDING", step=None)])
    rows = load_results(tmp_path).set_index("trial_id")["status"].to_dict()
    assert rows == {"c1": "completed", "s1": "stopped", "r1": "interrupted", "p1": "interrupted"}
    error = load_results(tmp_path).set_index("trial_id").loc["r1", "error"]
    assert error == ("interrupted: the sweep was stopped (Ctrl-C) while this trial ran (at step "
                     "12); sae-sweep sweep --resume continues it")


def test_the_storage_error_of_two_drivers_creating_optuna_db_is_one_line(tmp_path, monkeypatch):
    import sqlalchemy.exc

    from sweep import SweepConfig
    from sweep.driver import StorageError, make_searcher

    cfg = SweepConfig.from_dict(tiny_sweep("c", tmp_path / "exp"))

    def clash(*args, **kwargs):
        raise sqlalchemy.exc.IntegrityError(
            "INSERT INTO alembic_version", {}, Exception(
                "UNIQUE constraint failed: alembic_version.version_num"))

    monkeypatch.setattr("optuna.storages.RDBStorage", clash)
    with pytest.raises(StorageError) as info:
        make_searcher(cfg, d_in=64)
    message = str(info.value)
    assert message.startswith("SweepConfig.optuna_storage: the Optuna study 'sae-sweep-exp' at "
                              "sqlite:///") and "\n" not in message
    assert "UNIQUE constraint failed" in message
