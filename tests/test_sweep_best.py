"""Results tables, `best` and the Pareto front on hand-made tables."""

import json

import pandas as pd
import pytest

from activation_cache import UserError
from sweep import print_best
from sweep.best import (QueryError, format_selection, pareto_front, select_best,
                        select_trials)
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
        ("f", "stopped", 0.35, 10.0, 64),      # early-stopped: shown apart, never ranked
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


def test_best_ranks_completed_trials_and_shows_stopped_ones_apart(experiment, capsys):
    best = print_best(experiment, top=3)
    assert list(best["trial_id"]) == ["d", "b", "c", "f"]   # f (stopped) after the ranking
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "3 of 4 completed trials, ranked on validation fvu (min):"
    assert lines[1].split()[:2] == ["trial_id", "fvu"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["d", "b", "c"]
    assert lines[5].startswith("not ranked: 1 stopped or interrupted trial(s)")
    assert lines[6].split()[:3] == ["trial_id", "status", "fvu"]
    assert lines[7].split()[:2] == ["f", "stopped"]
    assert lines[8].startswith("also in the table: 1 failed, 1 running")
    best = print_best(experiment, metric="l0", mode="min", top=2, output_format="csv")
    # f (stopped, l0 10) and g (running, l0 5) have the lowest l0 but are not ranked
    assert list(best["trial_id"]) == ["a", "b", "f"]
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("a,completed,20") and "f,stopped" in out
    assert out.endswith("\n") and not out.endswith("\n\n")


def test_where_filters_and_bad_queries_are_user_errors(experiment, capsys):
    best = print_best(experiment, where="l0 <= 45 and d_sae >= 64", output_format="json")
    # on the whole table: ranked b, a; then stopped f; then the running g, listed, not ranked
    assert list(best["trial_id"]) == ["b", "a", "f", "g"]
    records = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in records] == ["completed", "completed", "stopped", "running"]
    assert records[3]["l0"] == 5.0 and records[3]["d_sae"] == 64
    with pytest.raises(QueryError, match="l00.*columns are: trial_id"):
        print_best(experiment, where="l00 <= 4")
    with pytest.raises(QueryError, match="not a valid pandas query"):
        print_best(experiment, where="l0 <=")
    for unsupported in ("l0 if l0 else 1", "l0 in (1, "):  # NotImplementedError, TokenError
        with pytest.raises(QueryError, match="not a valid pandas query"):
            print_best(experiment, where=unsupported)
    with pytest.raises(QueryError, match="unknown metric"):
        print_best(experiment, metric="nope")


def test_the_sweeps_constraints_are_shown_and_rank_feasible_first_never_filter(experiment):
    frame = load_results(experiment)
    objective = {"metric": "fvu", "mode": "min", "constraints": [{"metric": "l0", "max": 45.0}]}
    chosen = select_trials(frame, objective=objective, top=10)
    assert list(chosen.ranked["trial_id"]) == ["b", "a", "d", "c"]   # feasible first, then fvu
    assert list(chosen.ranked["feasible"]) == [True, True, False, False]
    # the sweep's answer (export --trial best, the report's star) takes the feasible ones
    assert list(select_best(frame, objective=objective, top=5)["trial_id"]) == ["b", "a"]
    text = format_selection(chosen, marks=("Y", "N"))
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.split()[0] in "abcd"}
    assert rows["b"][1] == "Y" and rows["d"][1] == "N"          # the ok column
    assert "ok: meets l0 <= 45" in text
    assert "meeting l0 <= 45 first" in text.splitlines()[0]


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
    assert list(front["trial_id"]) == ["d", "b", "a", "f"]   # the front by fvu, then stopped f
    by_l0 = print_best(experiment, metric="l0", pareto=True)  # l0 is traded against fvu
    assert list(by_l0["trial_id"]) == ["a", "b", "d", "f"]    # f is not on the front
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


# -- a demo-like experiment: several architectures, a constraint, test figures ------------------

DEMO_OBJECTIVE = {"metric": "ce_loss_delta", "mode": "min",
                  "constraints": [{"metric": "l0", "max": 64.0}]}


def demo_like_rows():
    # trial, status, architecture, ce_loss_delta, l0
    table = [
        ("bt000001", "completed", "batchtopk", 0.110, 40.0),
        ("bt000002", "completed", "batchtopk", 0.090, 63.0),
        ("bt000003", "completed", "batchtopk", 0.050, 120.0),   # best value, infeasible
        ("tk000001", "completed", "topk", 0.100, 32.0),
        ("tk000002", "stopped", "topk", 0.300, 16.0),           # ASHA: not ranked
        ("tk000003", "interrupted", "topk", 0.010, 20.0),       # Ctrl-C: not ranked
        ("jr000001", "completed", "jumprelu", 0.070, 201.0),    # jumprelu never meets l0 <= 64
        ("jr000002", "completed", "jumprelu", 0.080, 350.0),
        ("jr000003", "failed", "jumprelu", None, None),
        ("bt000004", "running", "batchtopk", 0.500, 30.0),
        ("bt000005", "pending", "batchtopk", None, None),
    ]
    out = []
    for i, (tid, status, arch, ce, l0) in enumerate(table):
        metrics = {}
        if ce is not None:
            for prefix, shift in (("", 0.0), ("test_", 0.01)):
                metrics.update({f"{prefix}ce_loss_delta": ce + shift, f"{prefix}l0": l0 + 1,
                                f"{prefix}fvu": 0.3 + ce + shift,
                                f"{prefix}explained_variance": 0.7 - ce,
                                f"{prefix}dead_fraction": 0.01 * i, f"{prefix}kl_div": ce / 2,
                                f"{prefix}ce_loss_score": 0.9 - ce})
            metrics["l0"] = l0
        params = {"architecture": arch, "d_sae": 1152 * (1 + i % 3), "lr": 5e-3,
                  "logit_kl_weight": 0.5 + i, "aux_penalty": 0.03125 if arch != "jumprelu" else None,
                  "top_k": 16 + i if arch != "jumprelu" else None,
                  "l0_coefficient": 0.002 if arch == "jumprelu" else None}
        out.append(TrialRow(trial_id=tid, status=status, params=params, metrics=metrics,
                            error="TrialDiverged: diverged: fvu is nan at step 3"
                            if status == "failed" else None, step=100, tokens_seen=80_000,
                            train_seconds=12.5,
                            checkpoint_path=f"/very/long/path/to/the/tune/state/{tid}/checkpoint"))
    return out


@pytest.fixture
def demo_like(tmp_path):
    exp = tmp_path / "demo" / "sweep"
    write_results(demo_like_rows(), exp)
    (exp / SWEEP_FILE).write_text(json.dumps({"config": {
        "objective": DEMO_OBJECTIVE, "sae": {"n_batches_to_dead": 20},
        "search_space": {k: {} for k in ("architecture", "d_sae", "top_k", "aux_penalty",
                                         "logit_kl_weight", "l0_coefficient")}}}))
    return exp


def _readme_queries():
    """Every `sae-sweep best ...` example in README.md and the example configs."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    texts = [(root / "README.md").read_text()]
    texts += [p.read_text() for p in sorted((root / "examples").glob("*.yaml"))]
    found = []
    for text in texts:
        for match in re.finditer(r"sae-sweep best [^\n`]*", text):
            line = match.group(0).split(" #")[0].rstrip()
            if line.count('"') % 2:  # the end of a `ray exec ... "sae-sweep best X"` line
                line = line[:-1] if line.endswith('"') else line
            found.append(shlex.split(line)[1:])
    return found


def test_the_readme_queries_all_run_on_a_demo_like_experiment(demo_like, capsys):
    from sweep.cli import main

    queries = _readme_queries()
    assert len(queries) >= 8
    assert ["best", "runs/sweeps/architectures", "--where", "architecture == 'jumprelu'",
            "--top", "3"] in queries     # examples/sweep_architectures.yaml's
    assert ["best", "runs/sweeps/smollm2-l6", "--where", "l0 <= 48", "--top", "5"] in queries
    for query in queries:
        if query[1].endswith("-suite"):  # a suite's queries: tests/test_suite.py runs them on one
            continue
        args = [query[0], str(demo_like), *query[2:]]
        assert main(args) == 0, query
        out, err = capsys.readouterr()
        assert out.strip() and "Traceback" not in out + err, (query, out, err)
        if "--format" not in query and "--all-columns" not in query:
            assert max(map(len, out.splitlines())) <= 120, (query, out)


def test_an_empty_selection_is_one_line_and_exit_0(demo_like, capsys):
    from sweep.cli import main

    assert main(["best", str(demo_like), "--where", "architecture == 'standard'"]) == 0
    out, err = capsys.readouterr()
    assert out == ("no trial matches --where \"architecture == 'standard'\" (11 trial(s) in the "
                   "table: 6 completed, 1 stopped, 1 interrupted, 1 failed, 1 running, "
                   "1 pending)\n") and err == ""
    for fmt in ("csv", "json"):   # machine formats: an empty table on stdout, the line on stderr
        assert main(["best", str(demo_like), "--where", "l0 > 1e9", "--format", fmt]) == 0
        out, err = capsys.readouterr()
        assert out == ("[]\n" if fmt == "json" else "") and err.startswith("no trial matches")


def test_where_sees_the_whole_table_and_the_constraint_is_marked(demo_like, capsys):
    jr = print_best(demo_like, where="architecture == 'jumprelu'")
    assert list(jr["trial_id"]) == ["jr000001", "jr000002", "jr000003"]   # infeasible, shown
    assert list(jr["feasible"][:2]) == [False, False]
    out = capsys.readouterr().out
    assert "3 of 11 trials match" in out and "ok: meets l0 <= 64" in out
    assert "jr000003 failed" in " ".join(out.split())          # listed, with its error
    top = print_best(demo_like, top=10)
    ranked = top[top["status"] == "completed"]
    # feasible first (by ce_loss_delta), then the infeasible ones; never hidden
    assert list(ranked["trial_id"]) == ["bt000002", "tk000001", "bt000001",
                                        "bt000003", "jr000001", "jr000002"]
    assert list(top["trial_id"][6:]) == ["tk000003", "tk000002"]       # not ranked, apart
    capsys.readouterr()
    front = print_best(demo_like, pareto=True, where="l0 <= 1000")
    assert "jr000001" in set(front["trial_id"]) or "bt000003" in set(front["trial_id"])


def test_tables_fit_120_characters_and_all_columns_shows_everything(demo_like, capsys):
    print_best(demo_like, top=10)
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 120
    header = out.splitlines()[1].split()
    assert header[:5] == ["trial_id", "architecture", "ok", "ce_loss_delta", "l0"]
    assert "test_ce_loss_delta" in header and "test_l0" in header
    assert "more column(s): --all-columns" in out
    print_best(demo_like, top=10, all_columns=True)
    wide = capsys.readouterr().out
    assert max(map(len, wide.splitlines())) > 120
    for column in ("test_kl_div", "l0_coefficient", "train_seconds", "logit_kl_weight"):
        assert column in wide
    print_best(demo_like, output_format="csv", all_columns=True)
    csv = capsys.readouterr().out
    assert csv.endswith("\n") and "checkpoint_path" in csv.splitlines()[0]


def test_ranking_on_a_test_metric_is_labelled_and_warned_once(demo_like, capsys, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="sweep"):
        print_best(demo_like, metric="test_ce_loss_delta")
    out = capsys.readouterr().out
    assert "ranked on test_ce_loss_delta (test split)" in out and "validation test_" not in out
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test figures are for reporting" in warnings[0]
    print_best(demo_like)
    assert "ranked on validation ce_loss_delta (min)" in capsys.readouterr().out


def test_per_architecture_view_and_the_never_met_warning(demo_like, capsys):
    from sweep.best import never_met_warnings

    print_best(demo_like, per_architecture=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("batchtopk: 4 trials, 2 met l0 <= 64; best bt000002 val ce_loss_delta "
                        "0.09, l0 63; test ce_loss_delta 0.1, l0 64")
    assert lines[1] == "jumprelu: 3 trials, none met l0 <= 64 (closest l0 201)"
    assert lines[2].startswith("topk: 3 trials, 1 met l0 <= 64; best tk000001 val ")
    frame = load_results(demo_like)
    assert never_met_warnings(frame, DEMO_OBJECTIVE) == [lines[1]]
    assert never_met_warnings(frame, {"metric": "fvu", "mode": "min"}) == []


def test_best_and_report_agree_on_which_trials_exist(demo_like, capsys):
    from sweep.report import report_trials

    shown = print_best(demo_like, top=100, output_format="csv")
    plotted = report_trials(load_results(demo_like))
    assert set(shown["trial_id"]) == set(plotted["trial_id"])
    assert {"tk000002", "tk000003", "jr000001"} <= set(plotted["trial_id"])


def test_the_ok_marks_are_ascii_unless_the_output_is_a_utf8_terminal():
    import io

    from sweep.best import marks_for

    class Tty(io.StringIO):
        def __init__(self, encoding):
            super().__init__()
            self._encoding = encoding

        @property
        def encoding(self):
            return self._encoding

        def isatty(self):
            return True

    assert marks_for(io.StringIO()) == ("yes", "no")
    assert marks_for(Tty("UTF-8")) == ("✓", "✗")
    assert marks_for(Tty("ascii")) == ("yes", "no")
