"""The real thing: a SmolLM2 cache on the built-in corpus equals a direct run_with_cache."""

import math

import pytest
import torch

from activation_cache import CacheConfig, build_cache, load_model, open_cache

pytestmark = [pytest.mark.model, pytest.mark.slow]

HOOK = "blocks.6.hook_resid_post"


def test_smollm2_cache_matches_direct_run_and_logprobs_are_sane(tmp_path):
    torch.set_num_threads(2)
    cfg = CacheConfig.from_dict({
        "output": str(tmp_path / "cache"), "hooks": [HOOK], "max_text_length": 64,
        "dtype": "float32", "store_logits": True, "logits_top_k": 64, "max_tokens": 300,
        "batch_size": 4,
    })
    reader = open_cache(build_cache(cfg))
    m = reader.manifest
    assert m["model"]["d_model"] == 576 and reader.d_in(HOOK) == 576
    assert m["stored_hooks"] == [HOOK, "blocks.6.hook_resid_pre"]
    model = load_model(cfg.model)
    reader.check_model(m["model"])
    batch = next(iter(reader.sequence_batches("train", 3)))
    with torch.inference_mode():
        logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask.long(),
                                             names_filter=[HOOK, "blocks.6.hook_resid_pre"])
    for h in (HOOK, "blocks.6.hook_resid_pre"):
        assert torch.allclose(batch.acts[h], cache[h], atol=1e-4, rtol=1e-4), h
    lp = torch.log_softmax(logits.float(), -1)
    assert torch.allclose(lp.gather(-1, batch.clean_topk_indices), batch.clean_topk_logprobs,
                          atol=1e-4)
    nll = -batch.clean_next_token_logprob
    nll = nll[~torch.isnan(nll)]
    # real text under a real model: a few nats per token, far below uniform (log 49152 = 10.8)
    assert 1.0 < float(nll.mean()) < 6.0 < math.log(49152)
    tokens = reader.token_source(HOOK)
    first = next(iter(tokens.iter_batches(64, seed=0, epoch=0))).input
    assert first.shape == (64, 576) and torch.isfinite(first).all()
