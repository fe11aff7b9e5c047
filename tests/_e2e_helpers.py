"""Shared helpers of the end-to-end tests: the tiny transformer_lens model, text-like windows and
a small activation cache built from them, and a quiet end-to-end TrainingConfig.

Used by tests/test_end_to_end.py and the architecture contract suite (tests/test_architectures.py);
each test module builds its own model and caches from these (module-scoped fixtures there).
"""

from __future__ import annotations

import numpy as np

from activation_cache import CacheConfig, ModelSpec, model_identity, open_cache
from activation_cache.builder import Windows, build_from_windows
from trainer import TrainingConfig

SEQ, BOS, PAD = 16, 1, 0
HOOKS = ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_attn_out")
SPEC = ModelSpec(source="tiny", n_ctx=32, tiny_n_layers=3, tiny_d_model=32, tiny_d_mlp=64)
D = 32


def text_windows(n: int, seed: int, first_doc: int = 0) -> Windows:
    """Text-like windows: BOS, tokens from a skewed (Zipf-ish) distribution, right padding."""
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, 257) ** 1.1
    toks = rng.choice(np.arange(3, 259), size=(n, SEQ), p=probs / probs.sum())
    toks[:, 0] = BOS
    am = np.ones((n, SEQ), dtype=bool)
    for i in range(1, n, 2):
        length = int(rng.integers(5, SEQ))
        am[i, length:] = False
        toks[i, length:] = PAD
    return Windows(toks.astype(np.int64), am, first_doc + np.arange(n) // 2)


def build_cache(tmp_path_factory, model, name, n_train=48, n_val=16, **overrides):
    """A cache of ``n_train`` train and ``n_val`` val windows of ``model`` (SPEC) at HOOKS."""
    out = tmp_path_factory.mktemp(name)
    fields = dict(output=str(out), model=SPEC, hooks=HOOKS, max_text_length=SEQ,
                  shard_tokens=SEQ * 64, batch_size=16, dtype="float32")
    fields.update(overrides)
    cfg = CacheConfig(**fields)
    windows = {"train": text_windows(n_train, 1), "val": text_windows(n_val, 2, first_doc=1000)}
    uri = build_from_windows(cfg, model, model_identity(model, SPEC), windows)
    return open_cache(uri)


def e2e_config(**kw) -> TrainingConfig:
    """End-to-end training (logit KL on), quiet, no warm-ups, no checkpoints (calibration is the
    SAE's option: see e2e_sae)."""
    base = dict(use_end_to_end=True, use_logit_kl=True, logit_kl_weight=1.0, batch_size=8,
                show_progress=False, init_tokens=256, lr_warmup_steps=0, log_freq=1000,
                checkpoint_every=None, save_best=False, outlier_policy="none")
    base.update(kw)
    return TrainingConfig(**base)
