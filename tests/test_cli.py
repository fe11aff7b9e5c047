import subprocess
import sys

from sweep.cli import main


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "sweep.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ["demo", "cache", "train", "eval", "sweep", "best", "export", "report"]:
        assert f"    {cmd} " in out, cmd


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["cache", str(tmp_path / "missing.yaml")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "missing.yaml" in err and "Traceback" not in err


def test_a_damaged_sweep_json_is_a_one_line_user_error(tmp_path, capsys):
    (tmp_path / "sweep.json").write_text("{")
    assert main(["sweep", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-sweep sweep: error: ") and "sweep.json: not valid JSON" in err
    assert err.count("\n") == 1


def test_demo_refuses_zero_trials_before_any_work(tmp_path, capsys):
    # 0 used to fall back to the default trial count silently (``0 or 6``)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--num-samples", "0"]) == 2
    assert "--num-samples and --max-concurrent must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_export_to_a_file_is_a_one_line_user_error(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    assert main(["export", str(tmp_path), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-sweep export: error: --out") and "is a file" in err


def test_top_must_be_positive(capsys):
    import pytest

    for cmd in (["best", "x", "--top", "0"], ["report", "x", "--top", "-2"]):
        with pytest.raises(SystemExit) as exc:
            main(cmd)
        assert exc.value.code == 2
        assert "--top: must be >= 1" in capsys.readouterr().err


def test_cache_and_train_say_what_they_wrote_and_take_threads(tmp_path, capsys, caplog):
    import logging

    import torch
    import yaml

    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(6):
        (texts / f"d{i}.txt").write_text(f"text number {i} " * 40)
    cache = tmp_path / "cache"
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump({
        "output": str(cache), "model": {"source": "tiny", "n_ctx": 64},
        "corpus": {"source": "files", "paths": [str(texts)]},
        "hooks": ["blocks.0.hook_resid_post"], "max_text_length": 64, "dtype": "float32",
        "shard_tokens": 2048, "val_fraction": 0.34, "test_fraction": 0.0}))
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="activation_cache"):  # (pytest owns logging)
            assert main(["cache", str(tmp_path / "cache.yaml"), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        summary = caplog.records[-1].getMessage().splitlines()
        assert summary[0].startswith(f"cache {cache}: ") and summary[0].endswith(" kB")
        assert summary[1] == "  train 2,276 tokens (36 windows, 4 documents, 2 shards)"
        assert summary[2].startswith("  val ")
        assert summary[3] == "  blocks.0.hook_resid_post (d 64) as float32"
        assert summary[4].startswith("  built in ") and summary[4].endswith("tokens/s)")
        assert len(summary) == 5

        (tmp_path / "train.yaml").write_text(yaml.safe_dump({
            "cache": str(cache), "out_dir": str(tmp_path / "sae"),
            "sae": {"d_in": 64, "d_sae": 128, "top_k": 8, "hook_layer": 0,
                    "calibration_tokens": 256},
            "training": {"num_epochs": 1, "train_batch_tokens": 256, "log_freq": 4,
                         "init_tokens": 256, "eval_max_tokens": 256,
                         "show_progress": False}}))
        assert main(["train", str(tmp_path / "train.yaml"), "--threads", "1"]) == 0
        err_lines = capsys.readouterr().err.strip().splitlines()
        start = max(i for i, line in enumerate(err_lines) if line.startswith("trained "))
        last = err_lines[start:]
        assert last[0].startswith("trained batchtopk d_sae=128 on blocks.0.hook_resid_post: ")
        # the shipped encoder's figures, labelled with their split (no test split here)
        assert last[1].startswith("  shipped encoder: val fvu ") and "test" not in last[1]
        assert last[2] == f"  wrote {tmp_path / 'sae'}: final/, best/, saelens/, checkpoints/"
        # where the wall time went (wrapped to the table width)
        assert last[3].startswith("  time: ") and "in training steps" in last[3]
    finally:
        torch.set_num_threads(before)


def test_threads_default_to_the_cores_available():
    import os

    from sweep.cli import available_cores, build_parser

    assert available_cores() == len(os.sched_getaffinity(0))
    for cmd in ("cache", "train"):
        assert build_parser().parse_args([cmd, "x.yaml"]).threads is None   # -> available_cores
        assert build_parser().parse_args([cmd, "x.yaml", "--threads", "3"]).threads == 3
