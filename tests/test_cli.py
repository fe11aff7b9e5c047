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
