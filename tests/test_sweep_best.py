"""Results tables, `best` and the Pareto front on hand-made tables."""

import json

import pandas as pd
import pytest

from activation_cache import UserError
from sweep import print_best
from sweep.best import QueryError, pareto_front, select_best
from sweep.results import (RESULTS_FILE, SWEEP_FILE, TrialRow, load_results, merge_history,
                           write_results)


def rows():
    # trial, status, fvu, l0, d_sae
    table = [
        ("a", "completed", 0.30, 20.0, 64),
        ("b", "completed", 0.20, 40.0, 128),
        ("c", "completed", 0.25, 50.0, 64),    # dominated by b (worse in both)
        ("d", "completed", 0.10, 80.0, 256),
        ("e", "failed", None, None, 256),      # diverged
        ("f", "stopped", 0.35, 10.0, 64),      # early-stopped: still ranked
        ("g", "running", 0.01, 5.0, 64),       # not finished: never ranked
    ]
    out = []
    for tid, status, fvu, l0, d_sae in table:
        metrics = {} if fvu is None else {"fvu": fvu, "l0": l0, "explained_variance": 1 - fvu}
        out.append(TrialRow(trial_id=tid, status=status, params={"d_sae": d_sae, "lr": 1e-3},
                            metrics=metrics, error="TrialDiverged: diverged: fvu is nan at step 3"
                            if status == "failed" else None, tokens_seen=1000))
    return out


@pytest.fixture
def experiment(tmp_path):
    write_results(rows(), tmp_path)
    (tmp_path / SWEEP_FILE).write_text(json.dumps(
        {"config": {"objective": {"metric": "fvu", "mode": "min", "constraints": []}}}))
    return tmp_path


def test_results_table_schema_and_readable_without_ray(experiment):
    import pyarrow.parquet as pq

    table = pq.read_table(experiment / RESULTS_FILE)
    cols = table.column_names
    assert cols[:6] == ["trial_id", "status", "error", "num_failures", "node_id", "node_ip"]
    assert cols.index("d_sae") < cols.index("fvu") < cols.index("tokens_seen")
    frame = load_results(experiment)
    assert len(frame) == 7
    failed = frame.set_index("trial_id").loc["e"]
    assert failed["status"] == "failed" and "diverged" in failed["error"]
    assert pd.isna(failed["fvu"])


def test_rows_reject_clashing_columns():
    with pytest.raises(ValueError, match="used twice"):
        TrialRow(trial_id="x", status="completed", params={"fvu": 1}, metrics={"fvu": 0.1})


def test_best_ranks_finished_trials(experiment, capsys):
    best = print_best(experiment, top=3)
    assert list(best["trial_id"]) == ["d", "b", "c"]
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["trial_id", "status", "fvu"]
    best = print_best(experiment, metric="l0", mode="min", top=2, output_format="csv")
    assert list(best["trial_id"]) == ["f", "a"]        # g (running, l0 5) is not ranked
    assert "f,stopped" in capsys.readouterr().out


def test_where_filters_and_bad_queries_are_user_errors(experiment, capsys):
    best = print_best(experiment, where="l0 <= 45 and d_sae >= 64", output_format="json")
    assert list(best["trial_id"]) == ["b", "a", "f"]
    assert json.loads(capsys.readouterr().out)[0]["trial_id"] == "b"
    with pytest.raises(QueryError, match="l00.*columns are: trial_id"):
        print_best(experiment, where="l00 <= 4")
    with pytest.raises(QueryError, match="not a valid pandas query"):
        print_best(experiment, where="l0 <=")
    for unsupported in ("l0 if l0 else 1", "l0 in (1, "):  # NotImplementedError, TokenError
        with pytest.raises(QueryError, match="not a valid pandas query"):
            print_best(experiment, where=unsupported)
    with pytest.raises(QueryError, match="unknown metric"):
        print_best(experiment, metric="nope")


def test_constraints_of_the_objective_filter_by_default(experiment):
    frame = load_results(experiment)
    best = select_best(frame, objective={"metric": "fvu", "mode": "min",
                                         "constraints": [{"metric": "l0", "max": 45.0}]}, top=5)
    assert list(best["trial_id"]) == ["b", "a", "f"]


def test_pareto_front_hand_computed():
    frame = pd.DataFrame({
        "trial_id": list("abcdefg"),
        "fvu": [0.30, 0.20, 0.25, 0.10, 0.20, 0.50, float("nan")],
        "l0": [20, 40, 50, 80, 40, 10, 1],
    })
    front = pareto_front(frame, ["fvu", "l0"], ["min", "min"])
    # c is dominated by b; e ties b exactly (both stay); g has no fvu
    assert sorted(front["trial_id"]) == ["a", "b", "d", "e", "f"]
    # maximise explained variance instead of minimising fvu: same front
    frame["ev"] = 1 - frame["fvu"]
    front2 = pareto_front(frame, ["ev", "l0"], ["max", "min"])
    assert sorted(front2["trial_id"]) == ["a", "b", "d", "e", "f"]
    # one metric: only the optimum (and its ties)
    assert list(pareto_front(frame, ["l0"], ["max"])["trial_id"]) == ["d"]


def test_print_best_pareto(experiment):
    front = print_best(experiment, pareto=True)
    assert list(front["trial_id"]) == ["d", "b", "a", "f"]   # sorted by fvu
    by_l0 = print_best(experiment, metric="l0", pareto=True)  # l0 is traded against fvu
    assert list(by_l0["trial_id"]) == ["f", "a", "b", "d"]
    assert list(by_l0.columns[:4]) == ["trial_id", "status", "l0", "fvu"]


def test_history_merge_keeps_latest_report_of_a_step():
    first = merge_history(None, [{"trial_id": "a", "step": 1, "fvu": 0.9},
                                 {"trial_id": "a", "step": 2, "fvu": 0.8}])
    # the trial crashed after step 2 and resumed from its step-1 checkpoint
    again = merge_history(first, [{"trial_id": "a", "step": 2, "fvu": 0.7},
                                  {"trial_id": "a", "step": 3, "fvu": 0.6}])
    assert list(again["step"]) == [1, 2, 3]
    assert list(again["fvu"]) == [0.9, 0.7, 0.6]


def test_missing_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no results table"):
        print_best(tmp_path)


def test_cli_best_and_its_user_errors(experiment, capsys):
    from sweep.cli import main

    assert main(["best", str(experiment), "--top", "1", "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trial_id,status,fvu") and out[1].startswith("d,completed,0.1")
    assert main(["best", str(experiment), "--where", "nope > 1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-sweep best: error: --where 'nope > 1'") and "Traceback" not in err
