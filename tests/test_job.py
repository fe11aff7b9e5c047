"""``train_from_yaml`` / ``sae-sweep train`` on an in-memory stand-in for the cache reader."""

import json

import pytest
import torch

import trainer.job as job_module
from activation_cache import ConfigError
from sweep.cli import main as cli_main
from trainer import DimensionMismatchError, TensorSource, TrainJobConfig, load_sae, train_from_yaml


pytestmark = pytest.mark.usefixtures("one_thread")


class FakeReader:
    """What train_from_yaml uses of activation_cache.CacheReader."""

    def __init__(self, d_in=16, splits=("train", "val")):
        g = torch.Generator().manual_seed(0)
        self.data = {s: torch.randn(768 if s == "train" else 256, d_in, generator=g) * 5 + 1
                     for s in splits}
        self.manifest = {"splits": {s: {} for s in splits}}
        self.requests = []

    def token_source(self, hook, split="train"):
        self.requests.append((hook, split))
        return TensorSource(self.data[split])


YAML = """
cache: {cache}
out_dir: {out}
sae: {{d_in: 16, d_sae: 64, top_k: 4, hook_layer: 2}}
training: {{num_epochs: 2, train_batch_tokens: 128, lr: 0.01, log_freq: 4, checkpoint_every: 6,
           show_progress: false}}
"""


@pytest.fixture
def fake_cache(monkeypatch):
    reader = FakeReader()
    monkeypatch.setattr(job_module, "_open_cache", lambda uri: reader)
    return reader


def test_train_from_yaml_writes_everything_and_resumes(tmp_path, fake_cache):
    path = tmp_path / "job.yaml"
    path.write_text(YAML.format(cache="some/cache", out=tmp_path / "run"))
    result = train_from_yaml(path)
    out = tmp_path / "run"
    assert set(fake_cache.requests) == {("blocks.2.hook_resid_post", "train"),
                                        ("blocks.2.hook_resid_post", "val")}
    assert result.steps == 12 and result.final.eval_tokens == 256
    for name in ("job.yaml", "final/weights.safetensors", "best/config.json",
                 "saelens/cfg.json", "checkpoints/step_00000012/trainer_state.json"):
        assert (out / name).exists(), name
    assert TrainJobConfig.from_yaml(out / "job.yaml").sae.hook_spec == "blocks.2.hook_resid_post"
    assert load_sae(out / "final").cfg.top_k == 4
    history = json.loads((out / "final" / "history.json").read_text())
    assert [h["step"] for h in history] == [4, 6, 8, 12]
    # running it again resumes from the finished checkpoint: no new steps
    again = train_from_yaml(path)
    assert again.steps == 12 and torch.equal(again.sae.W_enc, result.sae.W_enc)


def test_cli_train_with_out_override_and_no_resume(tmp_path, fake_cache):
    path = tmp_path / "job.yaml"
    path.write_text(YAML.format(cache="c", out=tmp_path / "ignored"))
    assert cli_main(["train", str(path), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "final" / "config.json").exists()
    assert not (tmp_path / "ignored").exists()
    assert cli_main(["train", str(path), "--out", str(tmp_path / "o"), "--no-resume"]) == 0
    assert sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir()) == [
        "step_00000006", "step_00000012"]


def test_wrong_d_in_and_bad_config_are_one_line_errors(tmp_path, fake_cache, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(YAML.format(cache="c", out=tmp_path / "o").replace("d_in: 16", "d_in: 12"))
    with pytest.raises(DimensionMismatchError, match=r"sae.d_in is 12 .* d_in=16"):
        train_from_yaml(path)
    assert cli_main(["train", str(path)]) == 2
    assert "error:" in capsys.readouterr().err
    path.write_text("cache: c\nsae: {d_in: 16, d_sae: 64, top_k: 4}\nhook: blocks.0.hook_resid_pre\n")
    with pytest.raises(ConfigError, match="TrainJobConfig.hook: .* differs from sae.hook_spec"):
        train_from_yaml(path)
    path.write_text("cache: c\nsae: {d_in: 16, d_sae: 64, top_k: 4}\ntraining: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"job.yaml: TrainJobConfig.training -> TrainingConfig.lr"):
        train_from_yaml(path)
    path.write_text("cache: c\nsae: {d_in: 16, d_sae: 64, top_k: 4}\nval_split: train\n")
    with pytest.raises(ConfigError, match=r"TrainJobConfig.val_split: must differ from train_split"):
        train_from_yaml(path)


def test_missing_val_split_trains_without_validation(tmp_path, monkeypatch):
    reader = FakeReader(splits=("train",))
    monkeypatch.setattr(job_module, "_open_cache", lambda uri: reader)
    path = tmp_path / "job.yaml"
    path.write_text(YAML.format(cache="c", out=tmp_path / "o"))
    result = train_from_yaml(path)
    assert result.final.eval_tokens == 0 and result.final.explained_variance is not None


def test_example_config_parses():
    from pathlib import Path
    cfg = TrainJobConfig.from_yaml(Path(__file__).parent.parent / "examples" / "train.yaml")
    assert cfg.sae.architecture == "batchtopk"


def test_train_from_yaml_on_a_real_tiny_cache(tmp_path):
    """The whole path: activation cache (tiny model) -> train_from_yaml -> saved + exported SAE."""
    from _cache_helpers import build_tiny  # tests/ is on sys.path (pytest rootdir insertion)

    from activation_cache import open_cache
    uri, _, _ = build_tiny(tmp_path / "cache")
    hook = "blocks.0.hook_resid_post"
    d_in = open_cache(uri).d_in(hook)
    path = tmp_path / "job.yaml"
    path.write_text(
        f"cache: {uri}\nout_dir: {tmp_path / 'run'}\n"
        f"sae: {{d_in: {d_in}, d_sae: {4 * d_in}, top_k: 4, hook_spec: {hook}}}\n"
        "training: {num_epochs: 3, train_batch_tokens: 64, lr: 0.005, log_freq: 2,"
        " show_progress: false}\n")
    result = train_from_yaml(path)
    assert result.final.eval_tokens > 0  # the cache's val split was used
    assert result.final.explained_variance is not None and result.steps > 0
    assert (tmp_path / "run" / "saelens" / "sae_weights.safetensors").exists()
    assert load_sae(tmp_path / "run" / "final").hook_spec == hook
    path.write_text(path.read_text().replace(f"d_in: {d_in},", f"d_in: {d_in + 1},"))
    with pytest.raises(DimensionMismatchError, match=f"d_in is {d_in + 1} .* d_in={d_in}"):
        train_from_yaml(path, out_dir=tmp_path / "run2")


def test_a_job_yaml_with_a_threshold_field_under_training_says_where_it_lives(tmp_path):
    """The BatchTopK threshold's settings are the architecture's: a `sae-sweep train` YAML that
    names one in its old place (training:) gets one line pointing at sae:."""

    job = tmp_path / "job.yaml"
    job.write_text("cache: c\nsae: {d_in: 8, d_sae: 32, top_k: 4}\n"
                   "training: {calibration_tokens: 512}\n")
    with pytest.raises(ConfigError) as err:
        TrainJobConfig.from_yaml(job)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{job}: TrainJobConfig.training -> ")
    assert ("TrainingConfig.calibration_tokens: not a training field: it belongs to the SAE "
            "config of architecture(s) batchtopk, ") in message
    assert message.endswith("move it to the `sae:` block (sae.calibration_tokens)")
    job.write_text("cache: c\nsae: {d_in: 8, d_sae: 32, top_k: 4, calibration_tokens: 512}\n")
    assert TrainJobConfig.from_yaml(job).sae.calibration_tokens == 512


class _Messages:
    def __init__(self):
        self.messages = []

    def on_train_start(self, **kw):
        pass

    def on_step(self, step):
        pass

    def on_metrics(self, record, checkpoint_dir):
        pass

    def on_message(self, text):
        self.messages.append(text)

    def on_train_end(self, result):
        pass


def test_train_from_yaml_says_where_its_time_went(tmp_path, fake_cache):
    path = tmp_path / "job.yaml"
    path.write_text(YAML.format(cache="c", out=tmp_path / "run"))
    reporter = _Messages()
    result = train_from_yaml(path, reporter=reporter)
    timing = result.extra["timing"]
    for phase in ("startup", "train", "eval_val", "checkpoint", "export"):
        assert timing[f"time_{phase}_s"] > 0, phase
    phases = sum(v for k, v in timing.items()
                 if k not in ("time_eval_s", "time_other_s", "time_wall_s"))
    assert timing["time_wall_s"] >= phases
    closing = reporter.messages[-1].splitlines()
    share = timing["time_train_s"] / timing["time_wall_s"]
    assert closing[0].startswith("trained batchtopk d_sae=64")
    assert closing[-1].startswith(f"  time: {share:.0%} of {timing['time_wall_s']:.1f} s in "
                                  "training steps (")
    assert "train " in closing[-1] and "eval_val " in closing[-1]
