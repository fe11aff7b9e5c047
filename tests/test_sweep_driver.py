"""How the driver assembles Tune and Optuna from a SweepConfig (no trials run here)."""

import optuna
import pytest
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from activation_cache import ConfigError
from sweep import SweepConfig, resume_sweep, run_sweep
from sweep.driver import ExperimentExistsError, NotAnExperimentError, _tune_config, make_searcher
from sweep.search_space import SearchSpace
from sweep.searcher import SweepSearcher
from sweep_helpers import build_tiny_cache, tiny_sweep


def cfg_for(tmp_path, **overrides):
    return SweepConfig.from_dict(tiny_sweep("unused-cache", tmp_path / "exp", **overrides))


def test_tune_config_single_objective_with_asha_and_constraints(tmp_path):
    cfg = cfg_for(tmp_path, max_concurrent_trials=3, num_samples=9, time_budget_s=60,
                  scheduler={"type": "asha", "grace_period": 2, "max_t": 8},
                  objective={"metric": "fvu", "mode": "min",
                             "constraints": [{"metric": "l0", "max": 12}]})
    tc = _tune_config(cfg, d_in=64)
    assert isinstance(tc.search_alg, ConcurrencyLimiter) and tc.search_alg.max_concurrent == 3
    searcher = tc.search_alg.searcher
    assert isinstance(searcher, SweepSearcher) and isinstance(searcher._space, SearchSpace)
    assert (searcher.metric, searcher.mode) == ("fvu", "min")
    sampler = searcher._ot_study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert isinstance(tc.scheduler, ASHAScheduler)
    assert (tc.scheduler.metric, tc.scheduler._mode) == ("fvu", "min")
    assert tc.num_samples == 9 and tc.time_budget_s == 60
    # the study lives in EXPERIMENT_DIR/optuna.db and is found again by name
    assert (cfg.experiment_path / "optuna.db").exists()
    assert optuna.load_study(study_name="sae-sweep-exp", storage=cfg.optuna_storage_url())


def test_pareto_objective_puts_metric_lists_on_the_searcher(tmp_path):
    cfg = cfg_for(tmp_path, sampler="nsgaii",
                  objective={"metric": ["fvu", "l0"], "mode": ["min", "min"],
                             "constraints": [{"metric": "dead_fraction", "max": 0.5}]})
    searcher = make_searcher(cfg, d_in=64)
    assert searcher.metric == ["fvu", "l0"] and searcher.mode == ["min", "min"]
    assert isinstance(searcher._ot_study.sampler, optuna.samplers.NSGAIISampler)
    assert [d.name for d in searcher._ot_study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert _tune_config(cfg, 64).scheduler is None


def test_sweeps_sharing_an_optuna_storage_get_their_own_studies(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a = SweepConfig.from_dict(tiny_sweep("c", tmp_path / "sweep-a", optuna_storage=url))
    b = SweepConfig.from_dict(tiny_sweep("c", tmp_path / "sweep-b", optuna_storage=url))
    assert (a.study_name, b.study_name) == ("sae-sweep-sweep-a", "sae-sweep-sweep-b")
    make_searcher(a, d_in=64)
    make_searcher(b, d_in=64)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage=url)}
    assert names == {"sae-sweep-sweep-a", "sae-sweep-sweep-b"}
    # the resolved name is stored with the config, so a resumed sweep finds its study
    assert SweepConfig.from_dict(a.to_dict()).study_name == "sae-sweep-sweep-a"


def test_any_optuna_storage_url_and_study_name(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    cfg = cfg_for(tmp_path, optuna_storage=url, study_name="mine")
    make_searcher(cfg, d_in=64)
    assert optuna.load_study(study_name="mine", storage=url)


def test_resume_of_a_folder_without_a_sweep_is_a_user_error(tmp_path):
    with pytest.raises(NotAnExperimentError, match="sweep.json"):
        resume_sweep(tmp_path)


def test_a_cache_without_a_val_split_is_refused_before_any_trial(tmp_path):
    cache = build_tiny_cache(tmp_path / "cache", max_tokens=2000, val_fraction=0.0)
    cfg = SweepConfig.from_dict(tiny_sweep(cache, tmp_path / "exp"))
    with pytest.raises(ConfigError, match="SweepConfig.cache: .* has no validation split"):
        run_sweep(cfg)
    assert not (tmp_path / "exp" / "sweep.json").exists()


def test_an_end_to_end_sweep_on_a_cache_without_logits_is_refused_up_front(tmp_path):
    cache = build_tiny_cache(tmp_path / "cache", max_tokens=2000)   # store_logits: false
    data = tiny_sweep(cache, tmp_path / "exp")
    data["training"].update(use_end_to_end=True)
    with pytest.raises(ConfigError, match=r"SweepConfig.cache: .* stores no clean logits, which "
                                          r"an end-to-end sweep .*store_logits: true"):
        run_sweep(SweepConfig.from_dict(data))
    assert not (tmp_path / "exp" / "sweep.json").exists()


def test_two_experiments_of_one_name_cannot_share_tune_storage(tmp_path):
    store = tmp_path / "store"
    (store / "exp").mkdir(parents=True)  # Tune state of an earlier sweep in another /x/exp
    cfg = SweepConfig.from_dict(tiny_sweep("unused-cache", tmp_path / "b" / "exp",
                                           storage_path=str(store)))
    with pytest.raises(ExperimentExistsError, match="already holds Ray Tune state"):
        run_sweep(cfg)
    assert not (tmp_path / "b" / "exp" / "sweep.json").exists()


@pytest.mark.parametrize("failure", [ConnectionError("Could not find any running Ray instance"),
                                     SystemExit(15)])
def test_an_unreachable_cluster_address_is_a_user_error(monkeypatch, failure):
    # what ray.init(address=...) does without a cluster: ConnectionError for "auto", and
    # SystemExit(15) after the GCS connection timeout for HOST:PORT (both seen with Ray 2.60)
    import ray

    from sweep.driver import RayConnectionError, ray_session

    def unreachable(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", unreachable)
    with pytest.raises(RayConnectionError, match="cannot connect to a Ray cluster at --address"):
        with ray_session("127.0.0.1:6379"):
            pass
