"""SweepConfig validation and the define-by-run search space."""

from pathlib import Path

import optuna
import pytest

from activation_cache import ConfigError
from sweep import SweepConfig
from sweep.search_space import SearchSpace
from sweep.trial_configs import build_trial_configs, check_space

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep.yaml"


def base(**overrides):
    data = {
        "cache": "runs/cache",
        "hook": "blocks.1.hook_resid_post",
        "experiment_dir": "runs/exp",
        "search_space": {
            "d_sae": {"type": "int", "low": 16, "high": 64, "log": True},
            "top_k": {"type": "int", "low": 2, "high": 200},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        },
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize("name", ["sweep.yaml", "sweep_e2e.yaml"])
def test_example_configs_load_and_round_trip(name):
    cfg = SweepConfig.from_yaml(EXAMPLE.with_name(name))
    again = SweepConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.search_space["top_k"].type == "int"
    check_space(cfg, d_in=576)   # SmolLM2's width: every corner is a valid trainer config


def test_unknown_keys_are_rejected_with_the_field_named():
    with pytest.raises(ConfigError, match="num_sample.*did you mean 'num_samples'"):
        SweepConfig.from_dict(base(num_sample=3))
    with pytest.raises(ConfigError, match="sae.top_kk: unknown SAEConfig field"):
        SweepConfig.from_dict(base(sae={"top_kk": 3}))
    with pytest.raises(ConfigError, match="training.lrr: unknown TrainingConfig field"):
        SweepConfig.from_dict(base(training={"lrr": 3}))
    with pytest.raises(ConfigError, match="training.max_tokens: is set by tokens_per_trial"):
        SweepConfig.from_dict(base(training={"max_tokens": 1000}))  # would be silently ignored
    with pytest.raises(ConfigError, match=r"SweepConfig.seed: must be an integer in \[0, 2\*\*32\)"):
        SweepConfig.from_dict(base(seed=-1, training={"seed": 0}))  # Optuna's sampler rejects it
    with pytest.raises(ConfigError, match=r"search_space.bogus"):
        SweepConfig.from_dict(base(search_space={"bogus": {"type": "int", "low": 1, "high": 2},
                                                 "d_sae": {"type": "int", "low": 8, "high": 9}}))
    with pytest.raises(ConfigError, match=r"ParamSpec: unknown key\(s\) 'hi'"):
        SweepConfig.from_dict(base(search_space={"d_sae": {"type": "int", "low": 8, "hi": 9}}))


def test_an_architecture_field_in_its_old_training_place_says_where_it_lives():
    """The BatchTopK threshold's warm-up, EMA rate and calibration are the architecture's own
    fields now: fixed under `training:` they get one line naming where they belong; searched
    (the search space is flat) they go to the SAE config and are drawn only for the
    architectures that have them."""
    with pytest.raises(ConfigError) as err:
        SweepConfig.from_dict(base(training={"threshold_warmup_steps": 30}))
    import trainer

    owners = ", ".join(trainer.field_catalog().owners("threshold_warmup_steps"))
    assert owners.startswith("batchtopk, ") and "matryoshka_batchtopk" in owners
    assert str(err.value) == (
        "SweepConfig.training.threshold_warmup_steps: is not a training field: it belongs to "
        f"the SAE config of architecture(s) {owners}; move it to the `sae:` block")
    fixed = SweepConfig.from_dict(base(sae={"threshold_warmup_steps": 30}))
    sae_cfg, _ = build_trial_configs(fixed, {"d_sae": 32, "top_k": 4, "lr": 1e-3}, d_in=16)
    assert sae_cfg.threshold_warmup_steps == 30
    space = dict(base()["search_space"], threshold_beta={"type": "float", "low": 0.9,
                                                         "high": 0.999})
    searched = SweepConfig.from_dict(base(search_space=space))
    sae_cfg, train_cfg = build_trial_configs(
        searched, {"d_sae": 32, "top_k": 4, "lr": 1e-3, "threshold_beta": 0.95}, d_in=16)
    assert sae_cfg.threshold_beta == 0.95 and not hasattr(train_cfg, "threshold_beta")
    with pytest.raises(ConfigError, match=r"search_space.threshold_beta: only applies to "
                                          r"architecture\(s\) batchtopk, .*matryoshka_batchtopk, "
                                          r"which this sweep never uses \(it uses topk\)"):
        SweepConfig.from_dict(base(search_space=space, sae={"architecture": "topk"}))
    with pytest.raises(ConfigError, match=r"sae.lr: is a training field"):
        SweepConfig.from_dict(base(sae={"lr": 1e-3}, search_space={
            "d_sae": {"type": "int", "low": 16, "high": 64}}))


def test_a_transcoder_sweep_names_its_output_hook():
    tc = {"architecture": {"type": "categorical",
                           "choices": ["batchtopk_transcoder", "batchtopk_skip_transcoder"]}}
    space = dict(base()["search_space"], **tc)
    with pytest.raises(ConfigError, match=r"SweepConfig.hook_out: architecture\(s\) "
                                          r"batchtopk_transcoder, batchtopk_skip_transcoder are "
                                          r"transcoders: name the hook they reconstruct"):
        SweepConfig.from_dict(base(search_space=space))
    with pytest.raises(ConfigError, match=r"SweepConfig.hook_out: is set \(a transcoder sweep\) "
                                          r"but architecture\(s\) batchtopk reconstruct"):
        SweepConfig.from_dict(base(hook_out="blocks.1.hook_mlp_out"))
    cfg = SweepConfig.from_dict(base(hook="blocks.1.ln2.hook_normalized",
                                     hook_out="blocks.1.hook_mlp_out", search_space=space))
    sae, _ = build_trial_configs(cfg, {"d_sae": 32, "top_k": 4, "lr": 1e-3,
                                       "architecture": "batchtopk_skip_transcoder"},
                                 d_in=16, d_out=24)
    assert (sae.architecture, sae.hook_spec, sae.hook_spec_out, sae.d_in, sae.d_out) == (
        "batchtopk_skip_transcoder", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out",
        16, 24)
    assert (sae.hook_layer, sae.hook_name) == (1, "ln2.hook_normalized")
    with pytest.raises(ConfigError, match="the width of 'blocks.1.hook_mlp_out' is unknown"):
        build_trial_configs(cfg, {"d_sae": 32, "top_k": 4, "lr": 1e-3,
                                  "architecture": "batchtopk_transcoder"}, d_in=16)
    # the data's fields are the sweep's: an output side cannot be fixed or searched
    with pytest.raises(ConfigError, match="sae.d_out: is set by the sweep"):
        SweepConfig.from_dict(base(sae={"d_out": 24}))


@pytest.mark.parametrize("spec, message", [
    ({"type": "int", "low": 8}, "ParamSpec.high: a int parameter needs a numeric high"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "ParamSpec.low: must be > 0"),
    ({"type": "int", "low": 9, "high": 8}, "ParamSpec.high: must be >= low"),
    ({"type": "categorical"}, "ParamSpec.choices"),
    ({"type": "normal", "low": 1, "high": 2}, "ParamSpec.type"),
])
def test_bad_domains(spec, message):
    with pytest.raises(ConfigError, match=message):
        SweepConfig.from_dict(base(search_space={"d_sae": spec}))


def test_cross_field_checks():
    # searched and fixed at the same time
    with pytest.raises(ConfigError, match="search_space.d_sae: is also fixed in `sae`"):
        SweepConfig.from_dict(base(sae={"d_sae": 32}))
    # top_k can never be below the smallest d_sae
    with pytest.raises(ConfigError, match="search_space.top_k: low \\(20\\) must be <= 15 \\(the smallest d_sae 16 - 1\\)"):
        SweepConfig.from_dict(base(search_space={
            "d_sae": {"type": "int", "low": 16, "high": 64},
            "top_k": {"type": "int", "low": 20, "high": 40}}))
    with pytest.raises(ConfigError, match="every choice must be <= "):
        SweepConfig.from_dict(base(search_space={
            "d_sae": {"type": "categorical", "choices": [16, 64]},
            "top_k": {"type": "categorical", "choices": [4, 32]}}))
    # a loss weight that would have no effect
    with pytest.raises(ConfigError, match="logit_kl_weight: has no effect"):
        SweepConfig.from_dict(base(search_space={
            "d_sae": {"type": "int", "low": 16, "high": 64},
            "logit_kl_weight": {"type": "float", "low": 0.1, "high": 1.0}}))
    # l1 only for the standard architecture
    with pytest.raises(ConfigError, match="l1_coefficient: only applies to architecture\\(s\\) standard"):
        SweepConfig.from_dict(base(search_space={
            "d_sae": {"type": "int", "low": 16, "high": 64},
            "l1_coefficient": {"type": "float", "low": 0.1, "high": 1.0}}))
    with pytest.raises(ConfigError, match="needs one mode per metric"):
        SweepConfig.from_dict(base(objective={"metric": ["fvu", "l0", "kl_div"],
                                              "mode": ["min", "min"]}))
    with pytest.raises(ConfigError, match="search d_sae or expansion_factor, not both"):
        SweepConfig.from_dict(base(search_space={
            "d_sae": {"type": "int", "low": 16, "high": 64},
            "expansion_factor": {"type": "int", "low": 2, "high": 4}}))
    with pytest.raises(ConfigError, match="ResourcesConfig.gpu"):
        SweepConfig.from_dict(base(resources_per_trial={"gpu": 1.5}))


def test_objective_normalises_metric_lists():
    cfg = SweepConfig.from_dict(base(objective={"metric": ["fvu", "l0"], "mode": "min",
                                                "constraints": [{"metric": "dead_fraction",
                                                                 "max": 0.5}]}))
    assert cfg.objective.is_pareto
    assert cfg.objective.modes == ("min", "min")
    assert cfg.objective.monitored_metrics() == ("fvu", "l0", "dead_fraction")
    c = cfg.objective.constraints[0]
    assert c.violation(0.25) == pytest.approx(-0.25)
    assert c.violation(0.75) == pytest.approx(0.25)
    assert c.violation(float("nan")) == 1.0


def _sample(cfg, d_in, n, seed=0):
    space = SearchSpace(cfg, d_in)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5))
    out = []
    for i in range(n):
        trial = study.ask()
        derived = space(trial)
        params = {**trial.params, **derived}
        out.append(params)
        # a fake objective so that TPE models the space after the startup trials
        study.tell(trial, float(params.get("top_k", 0)) / params["d_sae"] + i * 1e-3)
    return out


def test_sampled_top_k_is_always_below_d_sae():
    cfg = SweepConfig.from_dict(base(search_space={
        "d_sae": {"type": "int", "low": 8, "high": 64, "log": True},
        "top_k": {"type": "int", "low": 1, "high": 100},
    }))
    samples = _sample(cfg, d_in=16, n=60)
    assert all(1 <= p["top_k"] < p["d_sae"] for p in samples)
    # the cap matters: without it many draws in [1, 100] would exceed d_sae
    assert any(p["top_k"] >= 8 for p in samples)


def test_expansion_factor_and_architecture_conditionals():
    cfg = SweepConfig.from_dict(base(search_space={
        "architecture": {"type": "categorical", "choices": ["batchtopk", "standard"]},
        "expansion_factor": {"type": "categorical", "choices": [2, 4]},
        "top_k": {"type": "int", "low": 1, "high": 1000, "log": True},
        "aux_penalty": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
        "l1_coefficient": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
    }))
    samples = _sample(cfg, d_in=12, n=30, seed=1)
    archs = {p["architecture"] for p in samples}
    assert archs == {"batchtopk", "standard"}
    for p in samples:
        assert p["d_sae"] == 12 * p["expansion_factor"]
        if p["architecture"] == "batchtopk":
            assert "l1_coefficient" not in p and p["top_k"] < p["d_sae"] and "aux_penalty" in p
        else:
            assert "top_k" not in p and "aux_penalty" not in p and "l1_coefficient" in p
        sae, training = build_trial_configs(cfg, p, d_in=12)
        assert sae.d_sae == p["d_sae"] and sae.architecture == p["architecture"]
        assert sae.hook_spec == "blocks.1.hook_resid_post" and sae.hook_layer == 1
        assert training.max_tokens == cfg.tokens_per_trial


def test_every_registered_architecture_is_a_sweep_dimension_with_only_its_own_fields():
    import trainer
    from sweep.results import TrialRow, rows_to_frame

    # every architecture that reconstructs its input (a transcoder sweep names its output hook:
    # test_a_transcoder_sweep_names_its_output_hook)
    catalog = trainer.field_catalog()
    archs = [a for a in catalog.architectures if a not in catalog.transcoders]
    assert len(archs) >= 5
    cfg = SweepConfig.from_dict(base(search_space={
        "architecture": {"type": "categorical", "choices": archs},
        "d_sae": {"type": "int", "low": 32, "high": 64},
        "top_k": {"type": "int", "low": 2, "high": 8},
        "l1_coefficient": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
        "l0_coefficient": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    }))
    samples = _sample(cfg, d_in=12, n=60, seed=2)
    assert {p["architecture"] for p in samples} == set(archs)
    for p in samples:
        owned = set(trainer.field_catalog().owned[p["architecture"]])
        for name in ("top_k", "l1_coefficient", "l0_coefficient"):
            assert (name in p) == (name in owned), (p, name)  # drawn iff the arch has it
        sae, _ = build_trial_configs(cfg, p, d_in=12)
        assert sae.architecture == p["architecture"]
    # one typed schema: a field that does not apply is null, ints stay ints
    frame = rows_to_frame([TrialRow(trial_id=str(i), status="completed", params=p)
                           for i, p in enumerate(samples)])
    assert str(frame["top_k"].dtype) == "Int64" and str(frame["d_sae"].dtype) == "Int64"
    standard = frame[frame["architecture"] == "standard"]
    assert standard["top_k"].isna().all() and standard["l1_coefficient"].notna().all()
    # a field no drawn architecture has is refused up front
    with pytest.raises(ConfigError, match="l0_coefficient: only applies to architecture\\(s\\) "
                                          "jumprelu, which this sweep never uses"):
        SweepConfig.from_dict(base(search_space={
            "architecture": {"type": "categorical", "choices": ["topk", "batchtopk"]},
            "d_sae": {"type": "int", "low": 32, "high": 64},
            "l0_coefficient": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}))


def test_trial_configs_route_fields_and_check_space_uses_trainer_validation():
    cfg = SweepConfig.from_dict(base(training={"log_freq": 7}, search_space={
        "d_sae": {"type": "int", "low": 16, "high": 64},
        "top_k": {"type": "int", "low": 2, "high": 8},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "reconstruction_loss_weight": {"type": "float", "low": 0.5, "high": 1.0},
    }))
    sae, training = build_trial_configs(
        cfg, {"d_sae": 32, "top_k": 4, "lr": 1e-3, "reconstruction_loss_weight": 0.7}, d_in=8)
    assert (sae.d_in, sae.d_sae, sae.top_k) == (8, 32, 4)
    assert training.lr == 1e-3 and training.reconstruction_loss_weight == 0.7
    assert training.log_freq == 7 and training.seed == cfg.seed
    check_space(cfg, d_in=8)
    bad = SweepConfig.from_dict(base(sae={"top_k_aux": 40}, search_space={
        "d_sae": {"type": "int", "low": 16, "high": 64},
        "top_k": {"type": "int", "low": 2, "high": 8}}))
    with pytest.raises(ConfigError, match="would be invalid.*top_k_aux"):
        check_space(bad, d_in=8)


def test_objective_metrics_must_be_reported_and_computable():
    with pytest.raises(ConfigError, match="objective.metric: 'fvuu' is not a reported metric"):
        SweepConfig.from_dict(base(objective={"metric": "fvuu"}))
    with pytest.raises(ConfigError, match="'ce_loss_delta' is only computed by end-to-end"):
        SweepConfig.from_dict(base(objective={"metric": ["ce_loss_delta", "l0"]}))
    with pytest.raises(ConfigError, match="'kl_div' is only computed by end-to-end"):
        SweepConfig.from_dict(base(objective={"metric": "fvu", "constraints": [
            {"metric": "kl_div", "max": 0.1}]}))
    ok = SweepConfig.from_dict(base(training={"use_end_to_end": True},
                                    objective={"metric": ["ce_loss_delta", "l0"]}))
    assert ok.objective.metrics == ("ce_loss_delta", "l0")


def test_an_evaluators_metric_needs_its_evaluator_in_the_training_config():
    with pytest.raises(ConfigError, match="'feature_mcc' is computed by evaluator "
                                          "'ground_truth': add it to training.evaluators"):
        SweepConfig.from_dict(base(objective={"metric": "feature_mcc", "mode": "max"}))
    with pytest.raises(ConfigError, match="training.evaluators: unknown evaluator "
                                          r"'ground_trut' \(did you mean 'ground_truth'\?\)"):
        SweepConfig.from_dict(base(training={"evaluators": ["ground_trut"]}))
    ok = SweepConfig.from_dict(base(training={"evaluators": ["ground_truth"]},
                                    objective={"metric": ["fvu", "feature_mcc"],
                                               "mode": ["min", "max"],
                                               "constraints": [{"metric": "feature_recall_0.9",
                                                                "min": 0.1}]},
                                    scheduler={"type": "none"}))
    assert ok.objective.metrics == ("fvu", "feature_mcc")


def test_a_sweep_can_name_the_probing_evaluator_and_rank_on_its_fields():
    with pytest.raises(ConfigError, match="'probe_accuracy_k5' is computed by evaluator "
                                          "'probing'"):
        SweepConfig.from_dict(base(objective={"metric": "probe_accuracy_k5", "mode": "max"},
                                   scheduler={"type": "none"}))
    ok = SweepConfig.from_dict(base(training={"evaluators": ["probing"]},
                                    objective={"metric": ["fvu", "probe_accuracy_k5"],
                                               "mode": ["min", "max"]},
                                    scheduler={"type": "none"}))
    assert ok.objective.metrics == ("fvu", "probe_accuracy_k5")
