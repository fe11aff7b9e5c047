"""No command deletes what it did not write: export, train (final/, best/, saelens/,
checkpoints/) and the cache builder replace only their own outputs; anything else is refused
with one line and every byte of the user's files stays where it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sweep.cli import main as cli_main
from sweep.results import SWEEP_FILE, TrialRow, write_results
from trainer import (OutputFolderError, make_sae_config, atomic_directory, build_sae,
                     check_output_folder, export_sae, load_sae)
from trainer.output_folder import OUTPUT_MARKER, remove_output

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (what must survive a refused write)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("my own notes, not sae-sweep's\n")
    (path / "data").mkdir(exist_ok=True)
    (path / "data" / "table.csv").write_bytes(b"a,b\n1,2\n")
    return snapshot(path)


def tiny_sae(arch: str = "topk") -> object:
    options = {"top_k": 2} if arch == "topk" else {}
    sae = build_sae(make_sae_config(d_in=8, d_sae=16, architecture=arch, hook_layer=0, **options),
                    seed=0)
    sae.initialize_from_data(torch.randn(64, 8))
    return sae.eval()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# -- the rule -------------------------------------------------------------------------------


def test_a_folder_with_a_stray_file_is_refused_and_kept(tmp_path):
    before = user_folder(tmp_path / "out")
    with pytest.raises(OutputFolderError, match=r"holds files sae-sweep did not write "
                       r"\(data, notes.txt\); nothing was changed; choose a new or empty"):
        export_sae(tiny_sae(), tmp_path / "out", flag="--out")
    assert snapshot(tmp_path / "out") == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary sibling left behind either


def test_own_outputs_are_replaced_atomically_and_empty_folders_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    export_sae(tiny_sae(), tmp_path / "empty")
    first = snapshot(tmp_path / "empty")
    assert {"cfg.json", "sae_weights.safetensors", OUTPUT_MARKER} <= set(first)
    marker = json.loads(first[OUTPUT_MARKER])
    assert marker["kind"] == "export" and marker["written_by"] == "sae-sweep"
    assert sorted(marker["files"]) == ["cfg.json", "sae_weights.safetensors"]
    export_sae(tiny_sae("standard"), tmp_path / "empty", output_format="native", card="# card\n")
    assert sorted(os.listdir(tmp_path / "empty")) == [OUTPUT_MARKER, "README.md", "config.json",
                                                      "history.json", "weights.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["empty"]
    assert load_sae(tmp_path / "empty").architecture == "standard"


def test_a_user_file_added_to_our_output_makes_it_foreign(tmp_path):
    export_sae(tiny_sae(), tmp_path / "out")
    (tmp_path / "out" / "my-analysis.ipynb").write_text("{}")
    before = snapshot(tmp_path / "out")
    with pytest.raises(OutputFolderError, match=r"my-analysis.ipynb"):
        export_sae(tiny_sae(), tmp_path / "out")
    assert snapshot(tmp_path / "out") == before


def test_out_naming_a_file_is_refused(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(OutputFolderError, match=r"--out .*model.safetensors: is a file, not a "
                       "folder"):
        export_sae(tiny_sae(), target, flag="--out")
    assert target.read_bytes() == b"precious"


def test_dangerous_slips_are_refused_whatever_they_hold(tmp_path, monkeypatch):
    work = tmp_path / "project"
    before = user_folder(work)
    monkeypatch.chdir(work)
    with pytest.raises(OutputFolderError, match=r"^--out \.: is the current folder"):
        export_sae(tiny_sae(), Path("."), flag="--out")
    with pytest.raises(OutputFolderError, match=r"holds the current folder"):
        export_sae(tiny_sae(), tmp_path, flag="--out")
    assert snapshot(work) == before
    home = tmp_path / "home"
    home_files = user_folder(home)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(OutputFolderError, match=r"is your home folder"):
        export_sae(tiny_sae(), home, flag="--out")
    assert snapshot(home) == home_files
    # a folder holding this project: only checked (never handed to a writer in a test)
    project = Path(__file__).resolve().parents[1]
    for path in (project, project.parent):
        # (a checkout under the temp root: its parent also holds the test's HOME, refused first)
        with pytest.raises(OutputFolderError,
                           match=r"holds the sae-sweep project|current|holds your home folder"):
            check_output_folder(path, "export", flag="--out")
    with pytest.raises(OutputFolderError, match="filesystem root|home"):
        check_output_folder(Path("/"), "export")


def test_an_empty_current_folder_is_still_refused(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(OutputFolderError, match="is the current folder"):
        export_sae(tiny_sae(), Path("."), flag="--out")
    assert (tmp_path / "here").is_dir()


def test_a_symbolic_link_is_refused(tmp_path):
    before = user_folder(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputFolderError, match="symbolic link"):
        export_sae(tiny_sae(), tmp_path / "link")
    assert snapshot(tmp_path / "real") == before and (tmp_path / "link").is_symlink()


def test_another_kind_of_our_outputs_is_not_replaced(tmp_path):
    sae = tiny_sae()
    with atomic_directory(tmp_path / "final", kind="sae") as tmp:
        sae.save(tmp)
    before = snapshot(tmp_path / "final")
    with pytest.raises(OutputFolderError, match=r"is a saved SAE \(train's final/ or best/\), "
                       r"not an export"):
        export_sae(sae, tmp_path / "final", flag="--out")
    assert snapshot(tmp_path / "final") == before


def test_outputs_from_before_the_marker_are_recognised_when_unambiguous(tmp_path):
    """The rule for unmarked folders: only the names our writer writes, its required files
    present (and, for SAELens, metadata saying sae-sweep exported it)."""
    sae = tiny_sae()
    legacy_final = tmp_path / "final"
    sae.save(legacy_final)  # config.json, weights.safetensors, history.json, no marker
    assert check_output_folder(legacy_final, "sae")
    with atomic_directory(legacy_final, kind="sae") as tmp:
        sae.save(tmp)
    assert (legacy_final / OUTPUT_MARKER).exists()

    legacy_export = tmp_path / "export"
    export_sae(sae, legacy_export, card="# card\n")
    (legacy_export / OUTPUT_MARKER).unlink()
    assert check_output_folder(legacy_export, "export")
    export_sae(sae, legacy_export)

    theirs = tmp_path / "theirs"  # a SAELens folder another tool wrote: not ours
    theirs.mkdir()
    (theirs / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 8}))
    (theirs / "sae_weights.safetensors").write_bytes(b"their weights")
    before = snapshot(theirs)
    with pytest.raises(OutputFolderError, match="did not write"):
        export_sae(sae, theirs)
    assert snapshot(theirs) == before


def test_pruning_checkpoints_leaves_a_folder_that_is_not_ours(tmp_path):
    odd = tmp_path / "checkpoints" / "step_00000001"
    before = user_folder(odd)
    assert remove_output(odd, "checkpoint") is False
    assert snapshot(odd) == before


# -- through the CLI: one line, exit 2, nothing touched ---------------------------------------


@pytest.fixture
def experiment(tmp_path):
    """A hand-made experiment folder whose one trial's checkpoint is a real one."""
    sae = tiny_sae()
    ckpt = tmp_path / "ckpt"
    sae.save(ckpt, fold=False)
    exp = tmp_path / "exp"
    write_results([TrialRow(trial_id="t1", status="completed", params={"top_k": 2},
                            metrics={"fvu": 0.3, "l0": 2.0, "test_fvu": 0.31, "test_l0": 2.1},
                            checkpoint_path=str(ckpt), tokens_seen=100)], exp)
    (exp / SWEEP_FILE).write_text(json.dumps({"config": {
        "objective": {"metric": "fvu", "mode": "min", "constraints": []},
        "search_space": {"top_k": {}}, "experiment_dir": str(exp)}}))
    return exp


def test_cli_export_refuses_a_user_folder_a_file_and_the_current_folder(
        experiment, tmp_path, capsys, monkeypatch, caplog):
    import logging

    before = user_folder(tmp_path / "mine")
    assert cli_main(["export", str(experiment), "--out", str(tmp_path / "mine")]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"sae-sweep export: error: --out {tmp_path / 'mine'}: holds files")
    assert "--out NEW_FOLDER" in line
    assert snapshot(tmp_path / "mine") == before

    (tmp_path / "a-file").write_text("keep me")
    assert cli_main(["export", str(experiment), "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert (tmp_path / "a-file").read_text() == "keep me"

    monkeypatch.chdir(tmp_path / "mine")
    assert cli_main(["export", str(experiment), "--out", "."]) == 2
    assert "is the current folder" in one_line_error(capsys)
    assert snapshot(tmp_path / "mine") == before

    # a new folder works, and the closing line labels the figures with their split
    with caplog.at_level(logging.INFO, logger="sweep"):  # (pytest owns logging)
        assert cli_main(["export", str(experiment), "--out", str(tmp_path / "new")]) == 0
    closing = caplog.records[-1].getMessage().splitlines()
    assert closing[0].startswith(f"exported trial t1 in SAELens format to {tmp_path / 'new'}: ")
    assert closing[1] == "  shipped encoder: val fvu 0.3, l0 2.0; test fvu 0.31, l0 2.1"
    card = (tmp_path / "new" / "README.md").read_text()
    assert "| metric | val (selection) | test (reported) |" in card
    assert "| fvu | 0.3 | 0.31 |" in card


TRAIN_YAML = """
cache: {cache}
out_dir: {out}
sae: {{d_in: 64, d_sae: 128, top_k: 4, hook_spec: blocks.0.hook_resid_post,
      calibration_tokens: 256}}
training: {{num_epochs: 1, train_batch_tokens: 256, log_freq: 4, checkpoint_every: 4,
           init_tokens: 256, eval_max_tokens: 256,
           show_progress: false}}
"""


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from sweep_helpers import build_tiny_cache

    return build_tiny_cache(tmp_path_factory.mktemp("cache") / "cache", max_tokens=3000)


def test_cli_train_refuses_a_user_folder_before_any_work(tiny_cache, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(TRAIN_YAML.format(cache=tiny_cache, out=tmp_path / "run"))
    before = user_folder(tmp_path / "mine")
    assert cli_main(["train", str(job), "--out", str(tmp_path / "mine"), "--threads", "1"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"sae-sweep train: error: --out {tmp_path / 'mine'}: holds files")
    assert snapshot(tmp_path / "mine") == before and not (tmp_path / "run").exists()

    assert cli_main(["train", str(job), "--threads", "1"]) == 0  # the job's own out_dir
    capsys.readouterr()
    assert json.loads((tmp_path / "run" / OUTPUT_MARKER).read_text())["kind"] == "train"
    # a user's file inside one of the run's parts: refused, even with --no-resume
    (tmp_path / "run" / "checkpoints" / "README.txt").write_text("why I kept these")
    run_before = snapshot(tmp_path / "run")
    assert cli_main(["train", str(job), "--no-resume", "--threads", "1"]) == 2
    assert "checkpoints/README.txt: is a file, not a folder" in one_line_error(capsys)
    assert snapshot(tmp_path / "run") == run_before
    (tmp_path / "run" / "checkpoints" / "README.txt").unlink()
    (tmp_path / "run" / "final" / "plot.png").write_bytes(b"\x89PNG")
    run_before = snapshot(tmp_path / "run")
    assert cli_main(["train", str(job), "--no-resume", "--threads", "1"]) == 2
    assert "final: holds files sae-sweep did not write (plot.png)" in one_line_error(capsys)
    assert snapshot(tmp_path / "run") == run_before
    (tmp_path / "run" / "final" / "plot.png").unlink()
    assert cli_main(["train", str(job), "--no-resume", "--threads", "1"]) == 0  # ours again


def test_train_and_export_write_the_same_saelens_metadata(tiny_cache, tmp_path):
    """One export path: train's saelens/cfg.json has export's metadata keys (and values where
    they describe the same model and data), and the same card sections."""
    from sweep import export_trial
    from trainer import train_from_yaml
    from trainer.checkpoint import latest_checkpoint

    job = tmp_path / "job.yaml"
    job.write_text(TRAIN_YAML.format(cache=tiny_cache, out=tmp_path / "run"))
    result = train_from_yaml(job)
    exp = tmp_path / "exp"
    write_results([TrialRow(trial_id="t1", status="completed", params={},
                            metrics={"fvu": result.final.fvu, "l0": result.final.l0},
                            checkpoint_path=str(latest_checkpoint(tmp_path / "run")),
                            tokens_seen=result.tokens_seen)], exp)
    (exp / SWEEP_FILE).write_text(json.dumps({"config": {
        "cache": tiny_cache, "objective": {"metric": "fvu", "mode": "min", "constraints": []},
        "search_space": {}}}))
    out = export_trial(exp, trial="t1", out_dir=tmp_path / "exported")
    trained = json.loads((tmp_path / "run" / "saelens" / "cfg.json").read_text())
    exported = json.loads((out / "cfg.json").read_text())
    assert set(trained["metadata"]) == set(exported["metadata"])
    for key in ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path",
                "model_fingerprint"):
        assert key in trained["metadata"]
        assert trained["metadata"][key] == exported["metadata"][key], key
    assert {k: v for k, v in trained.items() if k != "metadata"} == {
        k: v for k, v in exported.items() if k != "metadata"}

    def sections(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("## ")]

    card_train = (tmp_path / "run" / "saelens" / "README.md").read_text()
    card_export = (out / "README.md").read_text()
    assert sections(card_train)[0] == sections(card_export)[0] == "## Model and data"
    assert sections(card_train)[2:] == sections(card_export)[2:]
    for card in (card_train, card_export):
        assert "  - train: " in card and "  - val: " in card and "  - test: " in card
        assert "val (selection)" in card


# -- the cache builder's --overwrite ---------------------------------------------------------


def _cache_yaml(tmp_path: Path, output: Path, dtype: str = "float32") -> Path:
    import yaml

    texts = tmp_path / "texts"
    texts.mkdir(exist_ok=True)
    for i in range(6):
        (texts / f"d{i}.txt").write_text(f"text number {i} " * 40)
    path = tmp_path / f"cache-{dtype}.yaml"
    path.write_text(yaml.safe_dump({
        "output": str(output), "model": {"source": "tiny", "n_ctx": 64},
        "corpus": {"source": "files", "paths": [str(texts)]},
        "hooks": ["blocks.0.hook_resid_post"], "max_text_length": 64, "dtype": dtype,
        "val_fraction": 0.34, "test_fraction": 0.0}))
    return path


def test_cache_overwrite_onto_a_folder_with_a_foreign_file_is_refused(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cli_main(["cache", str(_cache_yaml(tmp_path, cache)), "--threads", "1"]) == 0
    capsys.readouterr()
    (cache / "my-notes.md").write_text("the notes I keep next to my cache")
    before = snapshot(cache)
    other = _cache_yaml(tmp_path, cache, dtype="float16")
    assert cli_main(["cache", str(other), "--overwrite", "--threads", "1"]) == 2
    line = one_line_error(capsys)
    assert "holds files that are not part of a cache (my-notes.md)" in line
    assert snapshot(cache) == before  # the cache and the notes, byte for byte
    (cache / "my-notes.md").unlink()
    assert cli_main(["cache", str(other), "--overwrite", "--threads", "1"]) == 0  # only ours


def test_cache_overwrite_never_replaces_a_folder_that_is_not_a_cache(tmp_path, capsys):
    before = user_folder(tmp_path / "mine")
    path = _cache_yaml(tmp_path, tmp_path / "mine")
    for extra in ([], ["--overwrite"]):
        assert cli_main(["cache", str(path), "--threads", "1", *extra]) == 2
        assert "not empty and not a cache" in one_line_error(capsys)
        assert snapshot(tmp_path / "mine") == before
    (tmp_path / "a-file").write_text("keep")
    assert cli_main(["cache", str(_cache_yaml(tmp_path, tmp_path / "a-file")),
                     "--overwrite", "--threads", "1"]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert (tmp_path / "a-file").read_text() == "keep"


def test_a_foreign_build_json_is_not_taken_for_a_cache(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "build.json").write_text('{"tool": "something else"}')
    before = snapshot(tmp_path / "c")
    assert cli_main(["cache", str(_cache_yaml(tmp_path, tmp_path / "c")), "--overwrite",
                     "--threads", "1"]) == 2
    assert "was not written by sae-sweep" in one_line_error(capsys)
    assert snapshot(tmp_path / "c") == before


def test_only_the_cache_files_temporaries_are_removed(tmp_path):
    from activation_cache.builder import is_cache_file
    from activation_cache.storage import Storage

    root = tmp_path / "c"
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "train-00000.safetensors.tmp-abc").write_bytes(b"partial")
    (root / "backup.tar.tmp-1").write_bytes(b"a user's file")
    assert Storage(str(root)).remove_temporaries(owned=is_cache_file) == 1
    assert sorted(snapshot(root)) == ["backup.tar.tmp-1"]
