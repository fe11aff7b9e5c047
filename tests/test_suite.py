"""Suites (issue 16): several hooks in one sweep, each with its own search.

* ``expand_hook_pattern``: lists, layer ranges, steps, brace lists, globs, friendly names; and
  the one-line errors (a missing hook with "did you mean", an empty range, a glob matching
  nothing, a hook twice);
* the config: ``hook`` or ``hooks``, never both nor neither;
* :class:`SuiteSearcher` routes: each hook's searcher sees only its own trials and results,
  trials go least-started first, every hook gets its own ``num_samples``, and its state pickles;
* a real suite on the tiny cache (two hooks): a ``hook`` column, one Optuna study per hook with
  its own trials, ``expansion_factor`` scaled by each hook's width, ``best --per-hook`` and a
  release that loads in sae_lens for every hook.
"""

import io
import pickle

import optuna
import pytest

from activation_cache import ConfigError, HookNameError, expand_hook_pattern
from sweep import SweepConfig
from sweep.suite import SuiteSearcher
from sweep_helpers import tiny_sweep

NAMES = [f"blocks.{i}.hook_resid_post" for i in range(0, 30, 2)] + [
    "blocks.6.hook_mlp_out", "blocks.6.ln2.hook_normalized"]


def test_layer_ranges_lists_and_globs_expand_in_order():
    assert expand_hook_pattern("blocks.{0..8..4}.hook_resid_post", NAMES) == [
        "blocks.0.hook_resid_post", "blocks.4.hook_resid_post", "blocks.8.hook_resid_post"]
    assert expand_hook_pattern("blocks.{20,6}.hook_resid_post", NAMES) == [
        "blocks.20.hook_resid_post", "blocks.6.hook_resid_post"]
    with pytest.raises(HookNameError, match="blocks.3.hook_resid_post"):
        expand_hook_pattern("blocks.{2..4}.hook_resid_post", NAMES)  # inclusive: 2, 3, 4
    globbed = expand_hook_pattern("blocks.*.hook_resid_post", NAMES)
    assert globbed[:3] == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post",
                           "blocks.4.hook_resid_post"]  # by layer, not as strings (10 < 2)
    assert len(globbed) == 15
    assert expand_hook_pattern(["blocks.6.hook_mlp_out", "resid_post.12"], NAMES,
                               n_layers=30) == ["blocks.6.hook_mlp_out", "blocks.12.hook_resid_post"]


@pytest.mark.parametrize("spec, words", [
    ("blocks.{0..29..3}.hook_resid_post", ["not there", "blocks.3.hook_resid_post"]),
    ("blocks.{8..2}.hook_resid_post", ["empty range"]),
    ("blocks.{a-b}.hook_resid_post", ["cannot read"]),
    ("blocks.*.hook_attn_out", ["matches no hook"]),
    ("blocks.6.hook_resid_pots", ["did you mean blocks.6.hook_resid_post"]),
    (["blocks.6.hook_mlp_out", "blocks.{6,8}.hook_mlp_out"], ["not there"]),
    (["blocks.6.hook_mlp_out", "blocks.6.hook_mlp_out"], ["listed twice"]),
    ([], ["non-empty list"]),
])
def test_bad_patterns_are_one_line_errors(spec, words):
    with pytest.raises(HookNameError) as err:
        expand_hook_pattern(spec, NAMES, field="SweepConfig.hooks")
    text = str(err.value)
    assert "\n" not in text and text.startswith("SweepConfig.hooks")
    for word in words:
        assert word in text


def test_a_sweep_takes_hook_or_hooks(tmp_path):
    data = tiny_sweep("cache", tmp_path / "exp")
    SweepConfig.from_dict(data)  # one hook keeps working
    suite = dict(data, hooks=["a", "b"])
    with pytest.raises(ConfigError, match="not both"):
        SweepConfig.from_dict(suite)
    suite.pop("hook")
    assert SweepConfig.from_dict(suite).is_suite
    with pytest.raises(ConfigError, match="is missing"):
        SweepConfig.from_dict({k: v for k, v in data.items() if k != "hook"})


class _Recorder:
    """A stand-in hook searcher: records what it is told; suggests a numbered config."""

    def __init__(self, name):
        self.name, self.suggested, self.results, self.completed = name, [], [], []

    def suggest(self, trial_id):
        self.suggested.append(trial_id)
        return {"lr": len(self.suggested)}

    def on_trial_result(self, trial_id, result):
        self.results.append(trial_id)

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.completed.append((trial_id, result["fvu"]))


def test_the_suite_searcher_keeps_each_hooks_evidence_apart():
    subs = {"A": _Recorder("A"), "B": _Recorder("B")}
    suite = SuiteSearcher(subs, {"A": 2, "B": 3}, metric="fvu", mode="min")
    given = [(f"t{i}", suite.suggest(f"t{i}")) for i in range(6)]
    hooks = [p["hook"] if isinstance(p, dict) else p for _, p in given]
    assert hooks[:5] == ["A", "B", "A", "B", "B"]  # least started first, then B's last one
    assert given[5][1] == SuiteSearcher.FINISHED  # each hook got exactly its num_samples
    for tid, params in given[:5]:
        suite.on_trial_result(tid, {"fvu": 0.5})
        suite.on_trial_complete(tid, {"fvu": 0.1 if params["hook"] == "A" else 0.9})
    assert subs["A"].suggested == ["t0", "t2"] and subs["B"].suggested == ["t1", "t3", "t4"]
    assert [v for _, v in subs["A"].completed] == [0.1, 0.1]
    assert [v for _, v in subs["B"].completed] == [0.9, 0.9, 0.9]
    assert subs["A"].results == ["t0", "t2"]
    clone = pickle.loads(pickle.dumps(suite))  # Tune saves the searcher with the experiment
    assert clone.owner == suite.owner and clone.started == {"A": 2, "B": 3}


def test_real_optuna_studies_of_a_suite_do_not_mix(tmp_path):
    from sweep.searcher import SweepSearcher

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def space(trial):
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)

    subs = {h: SweepSearcher(space=space, metric="fvu", mode="min", study_name=f"s.{h}",
                             storage=optuna.storages.RDBStorage(storage),
                             sampler=optuna.samplers.TPESampler(seed=0))
            for h in ("A", "B")}
    suite = SuiteSearcher(subs, {"A": 2, "B": 2}, metric="fvu", mode="min")
    for i in range(4):
        params = suite.suggest(f"t{i}")
        suite.on_trial_complete(f"t{i}", {"fvu": 0.1 if params["hook"] == "A" else 0.7})
    for hook, value in (("A", 0.1), ("B", 0.7)):
        study = optuna.load_study(study_name=f"s.{hook}", storage=storage)
        assert [t.value for t in study.trials] == [value, value]
        assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == (
            ["t0", "t2"] if hook == "A" else ["t1", "t3"])


# -- a real suite on the tiny cache ------------------------------------------------------------

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    from sweep import run_sweep
    from sweep_helpers import build_tiny_cache

    root = tmp_path_factory.mktemp("suite")
    cache = build_tiny_cache(root / "cache", hooks=HOOKS)
    data = tiny_sweep(cache, root / "exp", num_samples=2, tokens_per_trial=2048)
    data.pop("hook")
    data["hooks"] = "blocks.{0..1}.hook_resid_post"
    data["search_space"] = {"expansion_factor": {"type": "categorical", "choices": [2, 4]},
                            "top_k": {"type": "int", "low": 4, "high": 16, "log": True}}
    data["objective"] = {"metric": "fvu", "mode": "min", "constraints": [{"metric": "l0", "max": 64}]}
    results = run_sweep(SweepConfig.from_dict(data))
    return root, data, results


@pytest.mark.slow
def test_a_suite_searches_each_hook_on_its_own(suite_run):
    root, data, results = suite_run
    cfg = SweepConfig.from_dict(data)
    assert sorted(results["hook"]) == sorted(HOOKS * 2)  # num_samples per hook
    assert (results["status"] == "completed").all()
    assert set(results["d_sae"]) <= {128, 256}  # expansion_factor x d_in 64 of each hook
    for hook in HOOKS:
        study = optuna.load_study(study_name=f"{cfg.study_name}.{hook}",
                                  storage=cfg.optuna_storage_url())
        ids = set(results[results["hook"] == hook]["trial_id"])
        assert {t.user_attrs["ray_trial_id"] for t in study.trials} == ids
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


@pytest.mark.slow
def test_best_per_hook_prints_every_hooks_winner_with_test_figures(suite_run):
    from sweep.best import select_best
    from sweep.suite_results import print_per_hook

    root, data, results = suite_run
    out = io.StringIO()
    winners = print_per_hook(root / "exp", stream=out)
    text = out.getvalue()
    assert "test fvu" in text and "l0 <= 64" in text
    for hook in HOOKS:
        part = results[results["hook"] == hook]
        expected = select_best(part, objective=data["objective"], top=1).iloc[0]["trial_id"]
        assert winners.set_index("hook").loc[hook, "trial_id"] == expected
        assert expected in text
    out = io.StringIO()
    print_per_hook(root / "exp", hook="blocks.1.*", stream=out)
    assert "blocks.1.hook_resid_post" in out.getvalue()
    assert "blocks.0.hook_resid_post" not in out.getvalue()


@pytest.mark.slow
def test_the_release_loads_in_sae_lens_for_every_hook(suite_run):
    import torch
    import yaml
    from sae_lens import SAE

    from trainer import OutputFolderError, load_sae
    from sweep.release import export_release

    root, data, results = suite_run
    out = export_release(root / "exp", out_dir=root / "release")
    index = yaml.safe_load((out / "release.yaml").read_text())["release"]
    assert [e["id"] for e in index["saes"]] == list(HOOKS)
    assert index["model"] and index["sae_sweep"]["data"]["splits"]
    x = torch.randn(5, 64)
    for entry in index["saes"]:
        folder = out / entry["path"]
        sae = SAE.load_from_disk(str(folder), device="cpu")
        assert sae.cfg.metadata.hook_name == entry["id"]
        row = results.set_index("trial_id").loc[entry["trial_id"]]
        ours = load_sae(row["checkpoint_path"])
        with torch.no_grad():  # the same encoder as the trial's
            assert torch.allclose(sae.encode(x), ours.encode(x), atol=1e-4)
        assert entry["l0"] == pytest.approx(row["l0"])
    card = (out / "README.md").read_text()
    assert all(h in card for h in HOOKS) and "winners_by_layer.png" in card
    assert (out / "winners_by_layer.png").is_file()
    export_release(root / "exp", out_dir=out)  # an earlier release is replaced
    mine = root / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputFolderError):
        export_release(root / "exp", out_dir=mine)
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_the_cli_commands_of_a_suite(suite_run, capsys):
    from sweep.cli import main

    root, data, results = suite_run
    exp = str(root / "exp")
    assert main(["best", exp, "--per-hook"]) == 0
    assert "winner per hook" in capsys.readouterr().out
    assert main(["best", exp, "--hook", "blocks.0.*", "--format", "csv"]) == 0
    shown = capsys.readouterr().out
    assert "blocks.0.hook_resid_post" in shown and "blocks.1.hook_resid_post" not in shown
    assert main(["best", exp, "--hook", "blocks.7.hook_resid_post"]) == 2  # one line, exit 2
    assert main(["export", exp, "--release", str(root / "cli-release")]) == 0
    assert (root / "cli-release" / "release.yaml").is_file()
    assert main(["report", exp, "--out", str(root / "report")]) == 0
    assert (root / "report" / "winners_by_layer.png").is_file()


@pytest.mark.slow
def test_a_suites_closing_summary_is_per_hook(suite_run):
    from sweep import summarize_sweep

    root, data, results = suite_run
    text = summarize_sweep(root / "exp")
    assert "winner per hook" in text and "--per-hook" in text and "--release" in text
    assert all(h in text for h in HOOKS)
