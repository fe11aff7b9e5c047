"""The evaluator seam (trainer/evaluators/): registry, config names, the suite in the training
loop and in evaluate_split, the metrics record's extra fields, the field catalog and the sweep's
validation of evaluator metrics."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import trainer
from activation_cache import ConfigError
from trainer import (EvaluationSuite, Evaluator, EvaluatorDataError, MetricField,
                     MetricsRecord, TensorSource, TrainingConfig, build_sae, evaluate_split,
                     field_catalog, make_sae_config, register_evaluator, train_sae)
from trainer.evaluators import registration, resolve_evaluators

D_IN, D_SAE = 8, 16

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def toy_evaluator():
    """A plug-in evaluator registered for one test: ``decoder_norm_mean`` (higher is better,
    a made-up figure) and a final-only ``toy_final``; unregistered afterwards."""
    calls: list[tuple[str, bool]] = []

    @register_evaluator
    class ToyEvaluator(Evaluator):
        name = "toy"
        description = "mean decoder-row norm (a test's evaluator)"
        needs = ("decoder",)
        fields = (MetricField("decoder_norm_mean", "mean ||W_dec row||", "higher"),)

        def evaluate(self, sae: Any, ctx: Any) -> dict[str, Any]:
            calls.append((ctx.split, ctx.final))
            return {"decoder_norm_mean": float(sae.W_dec.detach().norm(dim=1).mean())}

    @register_evaluator
    class ToyFinal(Evaluator):
        name = "toy_final"
        description = "a costly evaluator (final evaluations only)"
        every_evaluation = False
        fields = (MetricField("toy_final_value", "always 1", "higher"),)

        def evaluate(self, sae: Any, ctx: Any) -> dict[str, Any]:
            calls.append(("final-only", ctx.final))
            return {"toy_final_value": 1.0}

    yield calls
    registration.REGISTERED.pop("toy", None)
    registration.REGISTERED.pop("toy_final", None)


def data(n: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def quiet(**kw: Any) -> TrainingConfig:
    base = dict(num_epochs=1, train_batch_tokens=64, log_freq=4, show_progress=False,
                checkpoint_every=None, init_tokens=128)
    base.update(kw)
    return TrainingConfig(**base)


def sae():
    return build_sae(make_sae_config(d_in=D_IN, d_sae=D_SAE, architecture="standard"), seed=0)


def test_registered_evaluators_and_their_order():
    assert trainer.evaluator_names()[:2] == ["reconstruction", "end_to_end"]
    assert "ground_truth" in trainer.evaluator_names()
    assert resolve_evaluators(TrainingConfig()) == ("reconstruction",)
    assert resolve_evaluators(TrainingConfig(use_end_to_end=True)) == ("reconstruction",
                                                                       "end_to_end")
    assert resolve_evaluators(TrainingConfig(evaluators=("ground_truth",))) == (
        "reconstruction", "ground_truth")


def test_unknown_evaluator_names_get_a_suggestion():
    with pytest.raises(ConfigError, match=r"TrainingConfig.evaluators: unknown evaluator "
                                          r"'grund_truth' \(did you mean 'ground_truth'\?\)"):
        TrainingConfig(evaluators=("grund_truth",))
    with pytest.raises(ConfigError, match="twice"):
        TrainingConfig(evaluators=("ground_truth", "ground_truth"))
    with pytest.raises(ConfigError, match="list of evaluator names"):
        TrainingConfig.from_dict({"evaluators": "ground_truth"})


def test_a_field_is_declared_once():
    class Clash(Evaluator):
        name = "clash"
        description = "declares fvu again"
        fields = (MetricField("fvu", "again", "lower"),)

        def evaluate(self, sae, ctx):
            return {}

    with pytest.raises(ValueError, match="already declared by evaluator 'reconstruction'"):
        register_evaluator(Clash)
    assert "clash" not in trainer.evaluator_names()
    with pytest.raises(ValueError, match="better"):
        MetricField("x", "y", "smaller")


def test_a_plug_in_evaluator_reaches_records_catalog_and_best_metric(toy_evaluator):
    cat = field_catalog()
    assert "decoder_norm_mean" in cat.objective_metrics and "decoder_norm_mean" in cat.metrics
    assert cat.metric_evaluator["decoder_norm_mean"] == "toy"
    assert cat.metric_better["decoder_norm_mean"] == "higher"
    assert cat.metric_needs_evaluator("decoder_norm_mean") == "toy"
    assert cat.metric_needs_evaluator("fvu") is None
    assert "toy_final_value" in cat.final_only_metrics
    assert "decoder_norm_mean" not in cat.final_only_metrics
    # it may decide `best/` (a numeric figure an evaluator declares)
    cfg = quiet(evaluators=("toy", "toy_final"), best_metric="decoder_norm_mean")
    x = data()
    result = train_sae(sae(), TensorSource(x), cfg, val_source=TensorSource(data(256, 1)))
    records = result.history
    assert len(records) >= 2
    for r in records:
        assert r.get("decoder_norm_mean") == pytest.approx(
            float(result.sae.W_dec.detach().norm(dim=1).mean()), rel=0.5)
        assert r.scalars()["decoder_norm_mean"] == r.extra["decoder_norm_mean"]
        assert "evaluator_seconds/toy" in r.scalars()
        assert r.fvu is not None  # reconstruction always runs
    # the final-only evaluator ran exactly once: the end-of-training record
    assert [c for c in toy_evaluator if c[0] == "final-only"] == [("final-only", True)]
    assert records[-1].get("toy_final_value") == 1.0
    assert all(r.get("toy_final_value") is None for r in records[:-1])
    assert result.best_value is not None
    # the reported split: a final evaluation, every evaluator
    test = evaluate_split(result.sae, TensorSource(data(256, 2)), cfg, split="test")
    assert test.eval_split == "test" and test.get("toy_final_value") == 1.0
    assert test.get("decoder_norm_mean") == pytest.approx(
        float(result.sae.W_dec.detach().norm(dim=1).mean()))
    assert ("test", True) in toy_evaluator


def test_extra_fields_round_trip_through_the_record():
    r = MetricsRecord(step=1, tokens_seen=2)
    r.set_metric("fvu", 0.5)
    r.set_metric("feature_mcc", 0.75)
    r.evaluator_seconds["ground_truth"] = 0.1
    assert r.fvu == 0.5 and r.get("feature_mcc") == 0.75 and r.get("missing") is None
    back = MetricsRecord.from_dict(r.to_dict())
    assert back == r and back.scalars()["feature_mcc"] == 0.75
    assert back.scalars()["evaluator_seconds/ground_truth"] == 0.1
    r.set_metric("feature_mcc", None)
    assert "feature_mcc" not in r.extra


def test_an_undeclared_figure_is_an_error():
    @register_evaluator
    class Sloppy(Evaluator):
        name = "sloppy"
        description = "returns a field it does not declare"
        fields = (MetricField("sloppy_ok", "declared"),)

        def evaluate(self, sae, ctx):
            return {"sloppy_ok": 1.0, "sloppy_other": 2.0}

    try:
        suite = EvaluationSuite.build(quiet(evaluators=("sloppy",)))
        with pytest.raises(ValueError, match="undeclared field.*sloppy_other"):
            suite.evaluate(sae(), TensorSource(data(64)), split="val", max_tokens=None,
                           final=True, objective_pass=dict)
    finally:
        registration.REGISTERED.pop("sloppy", None)


def test_data_an_evaluator_needs_is_checked_before_training():
    steps = []

    class Reporter:
        def on_train_start(self, **kw): steps.append("start")
        def on_step(self, step): steps.append(step)
        def on_metrics(self, record, checkpoint_dir): pass
        def on_message(self, text): pass
        def on_train_end(self, result): pass

    # ground truth on in-memory tokens: there is no cache to hold it
    with pytest.raises(EvaluatorDataError, match="ground_truth"):
        train_sae(sae(), TensorSource(data()), quiet(evaluators=("ground_truth",)),
                  reporter=Reporter())
    # end_to_end without the end-to-end objective
    with pytest.raises(EvaluatorDataError, match="use_end_to_end"):
        train_sae(sae(), TensorSource(data()), quiet(evaluators=("end_to_end",)),
                  reporter=Reporter())
    assert steps == []


# -- best, the card and the report show an evaluator's fields -------------------------------------


def test_best_card_and_report_show_evaluator_fields(tmp_path):
    import json

    from sweep import print_best, write_report
    from sweep.best import default_mode, select_trials
    from sweep.results import SWEEP_FILE, TrialRow, write_results
    from trainer import CARD_METRICS, render_model_card

    assert default_mode("feature_mcc") == "max" and default_mode("test_feature_mcc") == "max"
    assert default_mode("fvu") == "min" and default_mode("l0") == "min"
    rows = []
    for tid, fvu, l0, mcc in (("a", 0.2, 20.0, 0.5), ("b", 0.1, 40.0, 0.4), ("c", 0.3, 30.0, 0.9)):
        rows.append(TrialRow(trial_id=tid, status="completed", params={"lr": 1e-3},
                             metrics={"fvu": fvu, "l0": l0, "feature_mcc": mcc,
                                      "test_feature_mcc": mcc - 0.01,
                                      "feature_recall_0.9": mcc / 2},
                             tokens_seen=100))
    write_results(rows, tmp_path)
    (tmp_path / SWEEP_FILE).write_text(json.dumps(
        {"config": {"objective": {"metric": "fvu", "mode": "min", "constraints": []}}}))
    frame = print_best(tmp_path)
    assert list(frame["trial_id"]) == ["b", "a", "c"]
    assert "feature_mcc" in frame.columns and "test_feature_mcc" in frame.columns
    # ranking on the evaluator's field goes its declared way (higher is better)
    from sweep.results import load_results

    chosen = select_trials(load_results(tmp_path), metric="feature_mcc")
    assert list(chosen.ranked["trial_id"]) == ["c", "a", "b"]
    # the card
    assert "feature_mcc" in CARD_METRICS and "feature_recall_0.9" in CARD_METRICS
    cfg = make_sae_config(d_in=D_IN, d_sae=D_SAE, architecture="standard")
    card = render_model_card(cfg, facts={}, output_format="native", origin="a test",
                             budget="none", parameters_title="p", parameters={},
                             figures={"val": {"fvu": 0.1, "feature_mcc": 0.75},
                                      "test": {"fvu": 0.11, "feature_mcc": 0.74}})
    assert "| feature_mcc | 0.75 | 0.74 |" in card
    assert "`feature_mcc`: mean over true features" in card
    # the report plots L0 against it, with the front in its direction
    plots = write_report(tmp_path, out_dir=tmp_path / "report")
    assert (tmp_path / "report" / "pareto_l0_feature_mcc.png") in plots


def test_each_evaluator_headline_is_what_best_and_report_show_first():
    from sweep.best import headline_metrics
    from trainer import field_catalog

    heads = field_catalog().headline_metrics
    assert "probe_accuracy_k1" in heads and "feature_mcc" in heads
    # the bookkeeping ceiling and the other k are --all-columns material, not headlines
    assert "probe_accuracy_raw" not in heads and "probe_accuracy_k20" not in heads
    assert set(heads) <= set(field_catalog().plugin_metrics)
    assert headline_metrics() == heads
