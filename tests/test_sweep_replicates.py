"""Seed-aware ranking (issue 17 item 4), without Ray: the ``confirm`` config, the per-configuration
aggregation (mean, sd, n; hand-computed), the within-noise rule, ``export --trial best``'s
choice of a seed, ``best``'s table, and the confirm stage's plan (which configurations, which
seeds, which replicates are still to run)."""

import io
import json
import math
import re

import pandas as pd
import pytest

from activation_cache import ConfigError
from sweep import SweepConfig, print_best
from sweep.confirm import (CONFIRM_FILE, choose_configurations, pending_replicates,
                           plan_replicates, replicate_seeds, round_path)
from sweep.export import _pick
from sweep.replicates import (aggregate_configurations, export_choice, has_replicates,
                              mean_sd_n, noise_threshold, pooled_sd, rank_configurations)
from sweep.sweep_config import ConstraintSpec
from sweep_helpers import tiny_sweep


def _row(tid, fvu, *, of=None, seed=None, status="completed", l0=32.0, d_sae=128, probe=None):
    return {"trial_id": tid, "status": status, "d_sae": d_sae, "replicate_of": of, "seed": seed,
            "fvu": fvu, "l0": l0, "test_fvu": None if fvu is None else fvu + 0.01,
            "probe_accuracy_k5": probe, "step": 16, "checkpoint_path": f"/ckpt/{tid}",
            "final": True}


def _table(rows):
    frame = pd.DataFrame(rows)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


# A: fvu 1.1, 1.0, 1.2  -> mean 1.1, sd 0.1, n 3
# B: fvu 1.2, 1.4       -> mean 1.3, sd sqrt(0.02) = 0.141421, n 2
# C: fvu 2.0            -> n 1 (l0 100: violates l0 <= 64)
# D: fvu 1.35           -> n 1
# pooled s = sqrt((2 * 0.01 + 1 * 0.02) / 3) = 0.115470
# B vs A: 2 s sqrt(1/2 + 1/3) = 0.210819 >= |1.3 - 1.1| = 0.2   -> within noise
# D vs A: 2 s sqrt(1 + 1/3)   = 0.266667 >= 0.25                 -> within noise
# C vs A: infeasible -> not judged
HAND = [
    _row("a", 1.1, probe=0.80), _row("a1", 1.0, of="a", seed=1, probe=0.70),
    _row("a2", 1.2, of="a", seed=2, probe=0.90),
    _row("b", 1.2, d_sae=256), _row("b1", 1.4, of="b", seed=1, d_sae=256),
    _row("c", 2.0, l0=100.0), _row("d", 1.35),
    _row("e", 0.5, status="stopped"),           # stopped: never aggregated
    _row("a3", 0.1, of="a", seed=3, status="failed"),
]
L0_MAX = [ConstraintSpec(metric="l0", max=64)]


def test_mean_sd_n_by_hand():
    mean, sd, n = mean_sd_n([1.0, 1.2, 1.1, None, float("nan")])
    assert (mean, n) == (pytest.approx(1.1), 3)
    assert sd == pytest.approx(0.1)                 # the sample sd (ddof 1), not 0.0816
    mean, sd, n = mean_sd_n([2.0])
    assert mean == 2.0 and math.isnan(sd) and n == 1


def test_aggregation_per_configuration_is_generic_over_metric_columns():
    agg = aggregate_configurations(_table(HAND), params=["d_sae"]).set_index("configuration")
    assert list(agg.index) == ["a", "b", "c", "d"]   # completed runs only; e never, a3 failed
    assert agg.loc["a", "n"] == 3 and agg.loc["a", "trial_ids"] == "a,a1,a2"
    assert agg.loc["a", "fvu_mean"] == pytest.approx(1.1)
    assert agg.loc["a", "fvu_sd"] == pytest.approx(0.1)
    assert agg.loc["b", "fvu_mean"] == pytest.approx(1.3)
    assert agg.loc["b", "fvu_sd"] == pytest.approx(math.sqrt(0.02))
    assert agg.loc["b", "d_sae"] == 256 and agg.loc["b", "fvu_n"] == 2
    assert math.isnan(agg.loc["c", "fvu_sd"]) and agg.loc["c", "fvu_n"] == 1
    # any metric column is aggregated, e.g. one another evaluator adds
    assert agg.loc["a", "probe_accuracy_k5_mean"] == pytest.approx(0.8)
    assert agg.loc["a", "probe_accuracy_k5_sd"] == pytest.approx(0.1)
    assert agg.loc["b", "probe_accuracy_k5_n"] == 0
    assert agg.loc["a", "test_fvu_mean"] == pytest.approx(1.11)
    # hyperparameters, labels and the tail columns are not metrics
    assert not any(c.startswith(("d_sae_", "seed_", "step_", "replicate_of_"))
                   for c in agg.columns)


def test_pooled_sd_and_threshold_by_hand():
    agg = aggregate_configurations(_table(HAND), params=["d_sae"])
    s = pooled_sd(agg, "fvu")
    assert s == pytest.approx(math.sqrt((2 * 0.01 + 1 * 0.02) / 3))
    assert noise_threshold(s, 2, 3) == pytest.approx(0.210819, abs=1e-6)
    assert noise_threshold(s, 1, 3) == pytest.approx(0.266667, abs=1e-6)
    single = aggregate_configurations(_table([_row("x", 1.0), _row("y", 2.0)]), params=[])
    assert pooled_sd(single, "fvu") is None          # nobody has two runs: no noise estimate


def test_ranking_on_means_and_the_within_noise_flag():
    agg = aggregate_configurations(_table(HAND), params=["d_sae"])
    ranked = rank_configurations(agg, "fvu", "min", L0_MAX)
    assert list(ranked["configuration"]) == ["a", "b", "d", "c"]   # c fails l0 on its mean
    flags = dict(zip(ranked["configuration"], ranked["within_noise"]))
    assert flags == {"a": True, "b": True, "d": True, "c": None}
    thresholds = dict(zip(ranked["configuration"], ranked["noise_threshold"]))
    assert thresholds["b"] == pytest.approx(0.210819, abs=1e-6)
    # B's second run at 1.56: mean 1.38, sd 0.254558; s = sqrt((0.02 + 0.0648) / 3) = 0.168127;
    # threshold 2 s sqrt(1/2 + 1/3) = 0.306956 >= 0.28: still within noise
    moved = [r if r["trial_id"] != "b1" else _row("b1", 1.56, of="b", seed=1, d_sae=256)
             for r in HAND]
    ranked = rank_configurations(aggregate_configurations(_table(moved), params=["d_sae"]),
                                 "fvu", "min", L0_MAX).set_index("configuration")
    assert ranked.loc["b", "fvu_mean"] == pytest.approx(1.38)
    assert ranked.loc["b", "fvu_sd"] == pytest.approx(0.254558, abs=1e-6)
    assert ranked.loc["b", "noise_threshold"] == pytest.approx(0.306956, abs=1e-6)
    assert ranked.loc["b", "within_noise"] == True  # noqa: E712
    # max mode: the largest mean ranks first
    ranked = rank_configurations(aggregate_configurations(_table(HAND), params=[]), "fvu", "max")
    assert ranked.iloc[0]["configuration"] == "c"


def test_a_configuration_beyond_noise_is_not_flagged():
    rows = [_row("a", 1.0), _row("a1", 1.02, of="a", seed=1), _row("a2", 0.98, of="a", seed=2),
            _row("b", 1.3), _row("b1", 1.32, of="b", seed=1), _row("b2", 1.28, of="b", seed=2)]
    ranked = rank_configurations(aggregate_configurations(_table(rows), params=[]), "fvu", "min")
    # s = 0.02, threshold 2 * 0.02 * sqrt(2/3) = 0.03266 < 0.3
    assert list(ranked["within_noise"]) == [True, False]


def test_export_takes_the_best_mean_and_its_best_seed_on_validation():
    # per trial, b (0.9) is best; on means A (1.1) beats B (1.3)
    rows = [_row("a", 1.1), _row("a1", 1.0, of="a", seed=1), _row("a2", 1.2, of="a", seed=2),
            _row("b", 0.9), _row("b1", 1.7, of="b", seed=1), _row("z", 0.1, l0=90.0)]
    frame = _table(rows)
    choice = export_choice(frame, metric="fvu", mode="min", constraints=L0_MAX)
    assert choice.trial_id == "a1" and choice.configuration == "a"
    assert "seed 1" in choice.reason and "mean validation fvu over 3 run(s)" in choice.reason
    assert "1.1 ± 0.1" in choice.reason
    # never the test figures: a replicate better on test but worse on val is not taken
    frame.loc[frame["trial_id"] == "a2", "test_fvu"] = 0.0
    assert export_choice(frame, metric="fvu", mode="min", constraints=L0_MAX).trial_id == "a1"
    # the export path takes it
    info = {"config": {"objective": {"metric": "fvu", "mode": "min",
                                     "constraints": [{"metric": "l0", "max": 64}]}}}
    assert _pick(frame, "best", info)["trial_id"] == "a1"
    # without replicates: the best single trial, as before
    plain = _table([r for r in rows if r["replicate_of"] is None]).drop(
        columns=["replicate_of", "seed"])
    assert export_choice(plain, metric="fvu", mode="min") is None
    assert _pick(plain, "best", info)["trial_id"] == "b"


def _experiment(tmp_path, rows, constraints=({"metric": "l0", "max": 64},)):
    exp = tmp_path / "exp"
    exp.mkdir()
    _table(rows).to_parquet(exp / "results.parquet")
    (exp / "sweep.json").write_text(json.dumps({"config": {
        "objective": {"metric": "fvu", "mode": "min", "constraints": list(constraints)},
        "search_space": {"d_sae": {"type": "categorical", "choices": [128, 256]}}}}))
    return exp


def test_best_shows_mean_pm_sd_per_configuration(tmp_path):
    exp = _experiment(tmp_path, HAND)
    out = io.StringIO()
    shown = print_best(exp, stream=out)
    text = out.getvalue()
    assert "4 of 4 configurations (7 completed runs, 3 of them replicates)" in text
    assert "1.1 ± 0.1" in text and "1.3 ± 0.14" in text
    assert "near_best" in text and "pooled seed sd of fvu" in text
    assert list(shown["configuration"]) == ["a", "b", "d", "c"]
    out = io.StringIO()
    print_best(exp, stream=out, output_format="json")
    rows = json.loads(out.getvalue())
    assert rows[0]["configuration"] == "a" and rows[0]["fvu_n"] == 3
    assert rows[0]["fvu_sd"] == pytest.approx(0.1) and rows[0]["within_noise"] is True
    out = io.StringIO()
    print_best(exp, stream=out, per_trial=True)      # the per-trial view stays available
    assert "±" not in out.getvalue() and "a1" in out.getvalue()


def test_best_without_replicates_stays_as_it_was(tmp_path):
    exp = _experiment(tmp_path, [_row("a", 1.1), _row("b", 1.0)])
    assert not has_replicates(pd.read_parquet(exp / "results.parquet"))
    out = io.StringIO()
    shown = print_best(exp, stream=out)
    assert "±" not in out.getvalue() and "configurations" not in out.getvalue()
    assert list(shown["trial_id"]) == ["b", "a"]


# -- the confirm stage's plan ------------------------------------------------------------------


def _cfg(tmp_path, **confirm):
    return SweepConfig.from_dict(tiny_sweep(str(tmp_path / "cache"), tmp_path / "exp",
                                            num_samples=4, confirm=confirm or None,
                                            objective={"metric": "fvu", "mode": "min",
                                                       "constraints": [{"metric": "l0",
                                                                        "max": 64}]}))


def test_confirm_config_is_strict(tmp_path):
    assert _cfg(tmp_path, top=2, seeds=3).confirm.to_dict() == {"top": 2, "seeds": 3}
    assert _cfg(tmp_path).confirm is None
    for bad, message in (({"top": 0}, "confirm -> ConfirmConfig.top: must be an integer >= 1"),
                         ({"seeds": "2"}, "ConfirmConfig.seeds"),
                         ({"tops": 1}, "did you mean 'top'"),
                         ({"top": 5}, "confirm.top: must be <= num_samples (4)")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            _cfg(tmp_path, **bad)
    data = tiny_sweep("c", tmp_path / "e", confirm={"top": 1, "seeds": 1})
    data["search_space"]["seed"] = {"type": "int", "low": 0, "high": 9}
    with pytest.raises(ConfigError, match="seed cannot be searched"):
        SweepConfig.from_dict(data)


def test_the_plan_replicates_the_top_configurations_with_new_seeds(tmp_path):
    cfg = _cfg(tmp_path, top=2, seeds=2)
    assert replicate_seeds(cfg) == [1, 2]
    cfg7 = cfg.replace(training={**cfg.training, "seed": 7})
    assert replicate_seeds(cfg7) == [8, 9]
    frame = _table([_row("a", 1.1), _row("b", 1.0), _row("c", 0.5, l0=90.0),
                    _row("d", 0.2, status="stopped"), _row("e", 1.5)])
    assert choose_configurations(frame, cfg) == ["b", "a"]     # c infeasible, d stopped
    configs = {t: {"d_sae": 128, "lr": 0.001} for t in "abcde"}
    plan = {"replicates": plan_replicates(frame, configs, cfg)}
    assert [(e["replicate_of"], e["seed"]) for e in plan["replicates"]] == [
        ("b", 1), ("b", 2), ("a", 1), ("a", 2)]
    assert plan["replicates"][0]["config"] == {"d_sae": 128, "lr": 0.001, "replicate_of": "b",
                                               "seed": 1}
    # what is still to run: no completed or failed row of that (replicate_of, seed)
    done = _table([_row("a", 1.1), _row("x1", 1.0, of="b", seed=1),
                   _row("x2", None, of="a", seed=1, status="failed"),
                   _row("x3", 1.0, of="b", seed=2, status="interrupted"),
                   _row("x4", 1.0, of="a", seed=2, status="running")])
    assert [(e["replicate_of"], e["seed"]) for e in pending_replicates(plan, done)] == [
        ("b", 2), ("a", 2)]
    assert len(pending_replicates(plan, None)) == 4
    assert round_path("/x/tune", 1) == "/x/tune-confirm"
    assert round_path("/x/tune", 2) == "/x/tune-confirm-2"
    assert CONFIRM_FILE == "confirm.json"


def test_the_plan_takes_the_top_configurations_per_hook(tmp_path):
    cfg = _cfg(tmp_path, top=1, seeds=1)
    rows = [_row("a", 1.1), _row("b", 1.0), _row("c", 0.7), _row("d", 0.9)]
    for row, hook in zip(rows, ["h1", "h1", "h2", "h2"]):
        row["hook"] = hook
    frame = _table(rows)
    assert choose_configurations(frame, cfg) == ["b", "c"]


def test_constraints_are_judged_on_the_means():
    # F is best on fvu, but its mean l0 (70) breaks l0 <= 64 although one run (60) meets it
    rows = HAND + [_row("f", 0.5, l0=60.0), _row("f1", 0.6, of="f", seed=1, l0=80.0)]
    ranked = rank_configurations(aggregate_configurations(_table(rows), params=["d_sae"]),
                                 "fvu", "min", L0_MAX)
    assert list(ranked["configuration"]) == ["a", "b", "d", "f", "c"]
    assert ranked.set_index("configuration").loc["f", "l0_mean"] == pytest.approx(70.0)
    assert list(ranked["feasible"]) == [True, True, True, False, False]
    assert ranked.iloc[3]["within_noise"] is None      # infeasible: never "near the best"
    assert export_choice(_table(rows), metric="fvu", mode="min",
                         constraints=L0_MAX).configuration == "a"


def test_the_confirm_stage_resumes_its_last_run_and_reruns_only_lost_replicates(tmp_path):
    """run_confirm_stage with a fake Tune: a resumed driver restores the last round, then runs
    a new round of exactly the planned replicates that have no completed or failed row."""
    from sweep.confirm import read_plan, run_confirm_stage

    cfg = _cfg(tmp_path, top=1, seeds=3)
    exp = cfg.experiment_path
    exp.mkdir(parents=True)
    search = [_row("a", 1.0), _row("b", 1.2)]
    _table(search).to_parquet(exp / "results.parquet")
    calls = []

    def fake_round(rows):
        def run_round(path, entries):
            calls.append((path.rsplit("/", 1)[-1], None if entries is None else
                          [(e["replicate_of"], e["seed"]) for e in entries]))
            _table(search + rows).to_parquet(exp / "results.parquet")
        return run_round

    # first driver: plans 3 replicates of a, runs round 1; it "dies" with seed 1 completed,
    # seed 2 running and seed 3 never started
    run_confirm_stage(cfg, str(exp / "tune"), resumed=False,
                      search_configs=lambda: {"a": {"d_sae": 128}, "b": {"d_sae": 256}},
                      run_round=fake_round([_row("r1", 1.1, of="a", seed=1),
                                            _row("r2", 1.1, of="a", seed=2, status="running")]),
                      can_restore=lambda path: False, interrupted=lambda: True)
    assert calls == [("tune-confirm", [("a", 1), ("a", 2), ("a", 3)])]
    plan = read_plan(exp)
    assert plan["configurations"] == ["a"] and plan["rounds"] == [str(exp / "tune-confirm")]
    # resumed: the round is restored (its running replicate finishes there), then only the
    # replicate it never started runs, in a new round; the search configs are not read again
    calls.clear()
    restored = [_row("r1", 1.1, of="a", seed=1), _row("r2", 1.15, of="a", seed=2)]
    rounds = iter([fake_round(restored), fake_round(restored + [_row("r3", 1.2, of="a",
                                                                     seed=3)])])
    run_confirm_stage(cfg, str(exp / "tune"), resumed=True,
                      search_configs=lambda: pytest.fail("the search stage was read again"),
                      run_round=lambda p, e: next(rounds)(p, e),
                      can_restore=lambda path: path.endswith("tune-confirm"),
                      interrupted=lambda: False)
    assert calls == [("tune-confirm", None), ("tune-confirm-2", [("a", 3)])]
    assert pending_replicates(read_plan(exp), pd.read_parquet(exp / "results.parquet")) == []
