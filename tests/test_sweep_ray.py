"""A small real sweep on local Ray over a tiny real cache: Optuna-driven trials, a diverging
trial recorded as failed while the sweep goes on, the results tables, best, export and report."""

import json
import math

import optuna
import pandas as pd
import pytest
import ray

from sweep import SweepConfig, export_trial, load_history, print_best, run_sweep, write_report
from sweep.driver import ExperimentExistsError
from sweep_helpers import build_tiny_cache, tiny_sweep


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("cache") / "tiny")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def finished_sweep(cache, local_ray, tmp_path_factory):
    exp = tmp_path_factory.mktemp("exp") / "sweep"
    space = tiny_sweep(cache, exp)["search_space"]
    # lr 1e35 diverges at once (NaN loss): those trials must fail with a reason, the rest run
    space["lr"] = {"type": "categorical", "choices": [3e-3, 1e35]}
    cfg = SweepConfig.from_dict(tiny_sweep(cache, exp, search_space=space, num_samples=3,
                                           sampler="random", seed=5))
    results = run_sweep(cfg)
    return cfg, results


def test_sweep_results_table_is_complete(finished_sweep):
    cfg, results = finished_sweep
    assert len(results) == cfg.num_samples
    assert set(results["status"]) == {"completed", "failed"}
    done = results[results["status"] == "completed"]
    failed = results[results["status"] == "failed"]
    assert (done["lr"] == 3e-3).all() and (failed["lr"] == 1e35).all()
    # diverged trials: failed with the reason, not retried into the same NaN
    assert len(failed) == 1 and (failed["num_failures"] == 0).all()
    assert failed["error"].str.contains("TrainingDivergedError: diverged: step 2").all()
    assert failed["error"].str.contains("lower TrainingConfig.lr").all()
    # finished trials: every metric column filled, the budget spent, a checkpoint to export
    assert (done["top_k"] < done["d_sae"]).all()
    assert done["final"].all() and (done["tokens_seen"] >= 0.9 * cfg.tokens_per_trial).all()
    for col in ("fvu", "explained_variance", "l0", "dead_fraction", "mse", "train_seconds",
                "test_fvu", "test_l0", "test_explained_variance", "test_eval_tokens"):
        assert done[col].map(math.isfinite).all(), col
    # l0 (validation) and test_l0 are the shipped encoder's on held-out tokens: calibrated on
    # training tokens, so not top_k by construction
    assert (done["l0"] != done["top_k"]).any() and (done["test_l0"] != done["l0"]).all()
    assert done["checkpoint_path"].map(lambda p: (pd.notna(p))).all()
    assert done["node_id"].notna().all()
    # where each trial's time went (trainer.timing): the phases it entered, which sum with
    # time_other_s to its wall time, and the slot time the driver saw it hold (>= the wall)
    phases = ["time_startup_s", "time_train_s", "time_eval_val_s", "time_eval_test_s",
              "time_calibration_s", "time_checkpoint_s", "time_report_s"]
    for col in phases + ["time_eval_s", "time_other_s", "time_wall_s", "time_slot_s"]:
        assert (done[col] >= 0).all() and done[col].map(math.isfinite).all(), col
    assert (done["time_train_s"] > 0).all() and (done["time_eval_test_s"] > 0).all()
    total = done[phases].sum(axis=1) + done["time_other_s"]
    assert ((total - done["time_wall_s"]).abs() < 1e-6).all()
    evals = done["time_eval_val_s"] + done["time_eval_test_s"]
    assert ((done["time_eval_s"] - evals).abs() < 1e-9).all()
    assert (done["time_slot_s"] >= done["time_wall_s"]).all()


def test_history_has_every_reported_step_once(finished_sweep):
    cfg, results = finished_sweep
    history = load_history(cfg.experiment_path)
    done = results[results["status"] == "completed"]
    for tid in done["trial_id"]:
        steps = list(history[history["trial_id"] == tid]["step"])
        assert steps == sorted(set(steps)) and steps[0] == 4 and len(steps) >= 3
        last = history[history["trial_id"] == tid].iloc[-1]
        assert last["fvu"] == pytest.approx(done.set_index("trial_id").loc[tid, "fvu"])


def test_optuna_study_persists_and_never_saw_nan(finished_sweep):
    cfg, results = finished_sweep
    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.optuna_storage_url())
    states = sorted(t.state.name for t in study.trials)
    n_failed = int((results["status"] == "failed").sum())
    assert states.count("FAIL") == n_failed and states.count("COMPLETE") == len(results) - n_failed
    assert all(math.isfinite(t.value) for t in study.trials if t.state.name == "COMPLETE")


def test_best_export_and_report_on_a_real_sweep(finished_sweep, tmp_path, capsys):
    cfg, results = finished_sweep
    best = print_best(cfg.experiment_path, top=2, output_format="json")
    shown = json.loads(capsys.readouterr().out)
    assert shown[0]["trial_id"] == best.iloc[0]["trial_id"]
    done = results[results["status"] == "completed"]
    assert best.iloc[0]["fvu"] == pytest.approx(done["fvu"].min())

    out = export_trial(cfg.experiment_path, trial="best", out_dir=tmp_path / "sae",
                       output_format="saelens")
    card = (out / "README.md").read_text()
    assert best.iloc[0]["trial_id"] in card and "SAE.load_from_disk" in card
    from sae_lens import SAE as LensSAE

    lens = LensSAE.load_from_disk(str(out), device="cpu")
    assert lens.cfg.d_sae == int(best.iloc[0]["d_sae"])

    native = export_trial(cfg.experiment_path, trial=str(best.iloc[-1]["trial_id"]),
                          out_dir=tmp_path / "native", output_format="native")
    from trainer import load_sae

    assert load_sae(native).cfg.top_k == int(best.iloc[-1]["top_k"])
    plots = write_report(cfg.experiment_path, out_dir=tmp_path / "report")
    assert {p.name for p in plots} == {"pareto_l0_fvu.png", "training_curves.png"}
    assert all(p.stat().st_size > 10_000 for p in plots)


def test_rerunning_into_an_existing_experiment_is_refused(finished_sweep):
    cfg, _ = finished_sweep
    with pytest.raises(ExperimentExistsError, match="--resume"):
        run_sweep(cfg)


MLP_IN, MLP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def test_a_transcoder_sweep_searches_the_architecture_and_its_fields(local_ray, tmp_path):
    """Transcoders sweep like any architecture: the two transcoder architectures and their own
    fields are search dimensions, each trial reads the MLP input and reconstructs the MLP output
    from a cache holding both, and the winner exports to SAELens's transcoder class with both
    hooks and a card in its own words."""
    cache = build_tiny_cache(tmp_path / "mlp", hooks=(MLP_IN, MLP_OUT))
    data = tiny_sweep(cache, tmp_path / "sweep", num_samples=2, sampler="random", seed=1,
                      hook=MLP_IN, hook_out=MLP_OUT)
    data["search_space"].update(
        architecture={"type": "categorical",
                      "choices": ["batchtopk_transcoder", "batchtopk_skip_transcoder"]},
        threshold_beta={"type": "float", "low": 0.99, "high": 0.999})
    cfg = SweepConfig.from_dict(data)
    results = run_sweep(cfg)
    assert (results["status"] == "completed").all() and len(results) == 2
    assert results["architecture"].isin(["batchtopk_transcoder",
                                         "batchtopk_skip_transcoder"]).all()
    assert results["threshold_beta"].between(0.99, 0.999).all()
    assert results["fvu"].map(math.isfinite).all() and results["test_fvu"].map(math.isfinite).all()
    out = export_trial(cfg.experiment_path, trial="best", out_dir=tmp_path / "tc",
                       output_format="saelens")
    meta = json.loads((out / "cfg.json").read_text())
    assert meta["architecture"] in ("jumprelu_transcoder", "jumprelu_skip_transcoder")
    assert meta["metadata"]["hook_name"] == MLP_IN
    assert meta["metadata"]["hook_name_out"] == MLP_OUT
    card = (out / "README.md").read_text()
    assert "decoded to the output hook" in card and "BatchTopK with its learned" not in card
    from sae_lens import SAE as LensSAE

    lens = LensSAE.load_from_disk(str(out), device="cpu")
    assert lens.cfg.d_out == 64
