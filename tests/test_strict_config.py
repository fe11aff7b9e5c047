from dataclasses import dataclass, field
from typing import Optional

import pytest

from activation_cache import ConfigError, StrictConfig


@dataclass
class Inner(StrictConfig):
    width: int = 4

    def validate(self):
        self._require(self.width >= 1, "width", f"must be >= 1, got {self.width}")


@dataclass
class Outer(StrictConfig):
    lr: float = 1e-3
    layers: Optional[tuple[int, ...]] = None
    inner: Inner = field(default_factory=Inner)


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'lrr' \(did you mean 'lr'\?\)"):
        Outer.from_dict({"lrr": 1.0})


def test_nested_validation_names_path():
    with pytest.raises(ConfigError, match=r"Outer.inner -> Inner.width: must be >= 1, got 0"):
        Outer.from_dict({"inner": {"width": 0}})


def test_round_trip_dict_and_yaml(tmp_path):
    cfg = Outer.from_dict({"lr": "3e-4", "layers": [1, 2], "inner": {"width": 8}})
    assert cfg.lr == pytest.approx(3e-4) and cfg.layers == (1, 2) and cfg.inner.width == 8
    assert Outer.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert Outer.from_yaml(path) == cfg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Outer.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 2, column 1\)") as info:
        Outer.from_yaml(bad)
    assert "\n" not in str(info.value)  # the CLI prints it as one line
