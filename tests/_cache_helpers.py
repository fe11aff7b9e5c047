"""Shared helpers of the activation-cache tests: a tiny model and hand-made windows."""

from __future__ import annotations

import numpy as np

from activation_cache import CacheConfig, ModelSpec, load_model, model_identity
from activation_cache.builder import Windows, build_from_windows

SEQ = 16
BOS, PAD = 1, 0  # the tiny model's byte tokenizer


def tiny_spec() -> ModelSpec:
    return ModelSpec(source="tiny", n_ctx=32)


_MODEL = {}


def tiny_model():
    """The tiny model and its identity (built once per test session)."""
    if "m" not in _MODEL:
        spec = tiny_spec()
        model = load_model(spec)
        _MODEL["m"] = (model, model_identity(model, spec))
    return _MODEL["m"]


def random_windows(n: int, *, seed: int = 0, seq: int = SEQ, first_doc: int = 0) -> Windows:
    """Windows starting with BOS, right-padded to random lengths >= 4, 3 windows per document."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, 259, size=(n, seq))
    toks[:, 0] = BOS
    am = np.ones((n, seq), dtype=bool)
    for i in range(n):
        if i % 2:
            length = int(rng.integers(4, seq))
            am[i, length:] = False
            toks[i, length:] = PAD
    return Windows(toks.astype(np.int64), am, first_doc + np.arange(n) // 3)


def tiny_windows(n_train: int = 23, n_val: int = 7) -> dict[str, Windows]:
    return {"train": random_windows(n_train, seed=1), "val": random_windows(n_val, seed=2, first_doc=100)}


def tiny_config(output, **overrides) -> CacheConfig:
    fields = dict(output=str(output), model=tiny_spec(), hooks=("blocks.0.hook_resid_post",),
                  max_text_length=SEQ, shard_tokens=SEQ * 4, batch_size=3, dtype="float32")
    fields.update(overrides)
    return CacheConfig(**fields)


def build_tiny(output, windows=None, **overrides) -> tuple[str, CacheConfig, dict]:
    """Build a cache from hand-made windows with the tiny model; returns (uri, cfg, windows)."""
    model, ident = tiny_model()
    cfg = tiny_config(output, **overrides)
    windows = windows or tiny_windows()
    uri = build_from_windows(cfg, model, ident, windows)
    return uri, cfg, windows
