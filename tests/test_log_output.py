"""Output fit for a log file: a redirected `sae-sweep cache` and `sae-sweep train` (as a cluster
job would run them, `> log 2>&1`) hold no carriage return, no ESC code, no line over ~130
characters and no library noise; progress is a plain line every 10 % (or 30 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from activation_cache import LineProgress, progress_bar

MAX_LINE = 130
NOISE = ("Moving model to device", "it/s]", "Warning:", "warnings.warn", "Traceback")


def check_log(text: str) -> list[str]:
    assert "\r" not in text, "carriage return in the log"
    assert "\x1b" not in text, "ESC (cursor or colour code) in the log"
    lines = text.splitlines()
    too_long = [line for line in lines if len(line) > MAX_LINE]
    assert not too_long, f"lines over {MAX_LINE} characters: {too_long}"
    for noise in NOISE:
        assert noise not in text, f"{noise!r} in the log"
    return lines


def run_redirected(args: list[str], log: Path, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        env.pop(name, None)  # what the CLI sets itself; a user's shell would not have them
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "sweep.cli", *args], stdout=out,
                            stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=600).returncode
    text = log.read_text()
    assert rc == 0, text
    return text


def test_redirected_cache_and_train_write_plain_lines(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(10):
        (texts / f"d{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 31}" for j in range(600)))
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump({
        "output": str(tmp_path / "cache"), "model": {"source": "tiny", "n_ctx": 64},
        "corpus": {"source": "files", "paths": [str(texts)]},
        "hooks": ["blocks.0.hook_resid_post"], "max_text_length": 64, "dtype": "float32",
        "shard_tokens": 2048, "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2}))
    repo = Path(__file__).resolve().parents[1]
    cache_log = run_redirected(["cache", str(tmp_path / "cache.yaml"), "--threads", "1"],
                               tmp_path / "cache.log", repo)
    lines = check_log(cache_log)
    progress = [line for line in lines if "caching activations:" in line]
    assert 2 <= len(progress) <= 12, progress  # every 10 %, and the end
    assert progress[-1].endswith("elapsed") and "(100%)" in progress[-1]
    assert any(line.startswith("sae-sweep: cache ") for line in lines)

    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "cache": str(tmp_path / "cache"), "out_dir": str(tmp_path / "run"),
        "sae": {"d_in": 64, "d_sae": 256, "architecture": "batchtopk", "top_k": 8,
                "hook_spec": "blocks.0.hook_resid_post", "calibration_tokens": 256},
        "training": {"num_epochs": 3, "train_batch_tokens": 128, "log_freq": 5,
                     "checkpoint_every": 10, "init_tokens": 256,
                     "eval_max_tokens": 512}}))
    train_log = run_redirected(["train", str(tmp_path / "train.yaml"), "--threads", "1"],
                               tmp_path / "train.log", repo)
    lines = check_log(train_log)
    progress = [line for line in lines if line.startswith("batchtopk d_sae=256: ")]
    assert 2 <= len(progress) <= 12, progress
    records = [line for line in lines if line.startswith("step ")]
    assert records and all(" | tokens " in line for line in records)  # none glued to progress
    closing = lines[max(i for i, line in enumerate(lines) if line.startswith('trained ')):]
    assert closing[0].startswith("trained batchtopk d_sae=256 on blocks.0.hook_resid_post: ")
    assert closing[1].startswith("  shipped encoder: val fvu ") and "; test fvu " in closing[1]
    assert closing[2] == f"  wrote {tmp_path / 'run'}: final/, best/, saelens/, checkpoints/"
    assert closing[3].startswith("  time: ")


def test_line_progress_every_tenth_or_thirty_seconds():
    now = [0.0]
    lines: list[str] = []
    bar = LineProgress(1000, desc="work", unit="tok", emit=lines.append, clock=lambda: now[0])
    for _ in range(100):
        now[0] += 0.01
        bar.update(10)
    bar.close()
    assert len(lines) == 10 and lines[0].startswith("work: 100/1,000 tok (10%), ")
    assert lines[-1].startswith("work: 1,000/1,000 tok (100%), ") and "left" not in lines[-1]
    lines.clear()
    slow = LineProgress(10**6, desc="slow", emit=lines.append, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 16
        slow.update(1)
    assert len(lines) == 2 and "~" in lines[0] and "left" in lines[0]  # every 30 s


def test_progress_bar_is_plain_off_a_terminal_and_silent_when_asked(tmp_path):
    with open(tmp_path / "log", "w") as f:
        with progress_bar(20, desc="a", stream=f) as bar:
            for _ in range(20):
                bar.update(1)
            bar.set_postfix(ev="0.5")
            bar.write("a message on its own line")
        with progress_bar(20, desc="nested", stream=f, lines_off_terminal=False) as bar:
            bar.update(20)
        with progress_bar(20, desc="off", stream=f, disable=True) as bar:
            bar.update(20)
    text = (tmp_path / "log").read_text()
    check_log(text)
    assert "a message on its own line\n" in text and "nested" not in text and "off" not in text
    lines = text.splitlines()
    assert lines[-1] == "a message on its own line"
    assert [line.split(",")[0] for line in lines[:-1]] == [
        f"a: {n}/20 it ({5 * n}%)" for n in range(2, 21, 2)]


@pytest.mark.parametrize("width", [40, 120])
def test_reporter_lines_are_wrapped_not_cut(width):
    from trainer.reporting import wrap_text

    text = "word " * 60 + "/a/very/long/path/that/must/stay/whole" * 2
    wrapped = wrap_text(text, width=width)
    assert wrapped.split() == text.split()
    assert all(len(line) <= width or " " not in line.strip() for line in wrapped.splitlines())
