"""A cache reads back exactly what a direct run_with_cache of the same windows computes."""


import numpy as np
import pytest
import torch

from _cache_helpers import BOS, build_tiny, random_windows, tiny_model
from activation_cache.builder import make_layout
from activation_cache.compact_logits import compact_kl, full_kl
from activation_cache.reader import open_cache

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")


def direct(windows, hooks):
    model, _ = tiny_model()
    toks = torch.from_numpy(windows.tokens)
    am = torch.from_numpy(windows.attention_mask)
    with torch.inference_mode():
        logits, cache = model.run_with_cache(toks, attention_mask=am.long(), names_filter=list(hooks))
    return logits, cache


def all_windows(reader, split, batch_size=4):
    batches = list(reader.sequence_batches(split, batch_size))
    assert all(len(b) == batch_size for b in batches[:-1])
    return batches


def cat(batches, field):
    return torch.cat([getattr(b, field) for b in batches])


def test_activations_tokens_masks_and_full_logprobs_equal_direct_run(tmp_path):
    uri, cfg, windows = build_tiny(tmp_path / "c", hooks=HOOKS, store_logits=True,
                                   logits_top_k=None)
    reader = open_cache(uri)
    m = reader.manifest
    splice = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    assert m["hooks"] == list(HOOKS) and m["stored_hooks"] == list(HOOKS) + splice
    assert m["splice_hooks"] == dict(zip(HOOKS, splice))
    assert reader.d_in(HOOKS[0]) == 64 and m["logits"] == {"k": 259, "d_vocab": 259, "full": True}
    for split in ("train", "val"):
        w = windows[split]
        logits, cache = direct(w, list(HOOKS) + splice)
        got = all_windows(reader, split)
        assert torch.equal(cat(got, "tokens"), torch.from_numpy(w.tokens))
        assert cat(got, "tokens").dtype == torch.int64
        assert torch.equal(cat(got, "attention_mask"), torch.from_numpy(w.attention_mask))
        expected_train = torch.from_numpy(w.attention_mask & (w.tokens != BOS))
        assert torch.equal(cat(got, "train_mask"), expected_train)
        assert torch.equal(cat(got, "sequence"), torch.arange(len(w)))
        for h in list(HOOKS) + splice:
            acts = torch.cat([b.acts[h] for b in got])
            assert acts.dtype == torch.float32
            assert torch.equal(acts, cache[h]), h
        lp = torch.log_softmax(logits.float(), -1)
        top, idx = cat(got, "clean_topk_logprobs"), cat(got, "clean_topk_indices")
        assert idx.dtype == torch.int64 and top.shape == (len(w), 16, 259)
        assert torch.allclose(lp.gather(-1, idx), top, atol=1e-5)
        assert (top[..., :-1] >= top[..., 1:]).all()  # descending
        assert torch.allclose(cat(got, "clean_logsumexp"), torch.logsumexp(logits, -1), atol=1e-5)
        # full log-probs: the compact KL is the exact KL
        other = logits + 0.5 * torch.randn_like(logits)
        assert torch.allclose(compact_kl(top, idx, other), full_kl(logits, other), atol=1e-4)
        nxt = cat(got, "clean_next_token_logprob")
        am = torch.from_numpy(w.attention_mask)
        valid = am[:, :-1] & am[:, 1:]
        want = lp[:, :-1].gather(-1, torch.from_numpy(w.tokens)[:, 1:, None]).squeeze(-1)
        assert torch.allclose(nxt[:, :-1][valid], want[valid], atol=1e-5)
        assert torch.isnan(nxt[:, -1]).all() and torch.isnan(nxt[:, :-1][~valid]).all()


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_storage_dtypes_round_to_the_storage_dtype(tmp_path, dtype, torch_dtype):
    uri, _, windows = build_tiny(tmp_path / "c", dtype=dtype)
    reader = open_cache(uri)
    _, cache = direct(windows["train"], ["blocks.0.hook_resid_post"])
    acts = torch.cat([b.acts["blocks.0.hook_resid_post"] for b in reader.sequence_batches("train", 5)])
    assert acts.dtype == torch.float32
    assert torch.equal(acts, cache["blocks.0.hook_resid_post"].to(torch_dtype).float())
    per_token = reader.manifest["bytes_per_token"]["acts.blocks.0.hook_resid_post"]
    real = reader.manifest["splits"]["train"]["num_tokens"] + reader.manifest["splits"]["val"]["num_tokens"]
    slots = 16 * (len(windows["train"]) + len(windows["val"]))
    assert per_token == pytest.approx(64 * 2 * slots / real, rel=1e-3)


def test_topk_logits_and_model_stops_early_without_logits(tmp_path):
    model, _ = tiny_model()
    from _cache_helpers import tiny_config
    layout = make_layout(tiny_config(tmp_path / "x"), model, (BOS, 0))
    assert layout.stop_at_layer == 1  # blocks.0 hook on a 2-layer model: block 1 never runs
    layout = make_layout(tiny_config(tmp_path / "x", store_logits=True), model, (BOS, 0))
    assert layout.stop_at_layer is None
    uri, _, windows = build_tiny(tmp_path / "c", store_logits=True, logits_top_k=8,
                                 store_splice_residual=False)
    reader = open_cache(uri)
    assert reader.manifest["stored_hooks"] == ["blocks.0.hook_resid_post"]
    logits, _ = direct(windows["train"], [])
    got = list(reader.sequence_batches("train", 100))
    assert len(got) == 1
    b = got[0]
    assert b.clean_topk_logprobs.shape == (23, 16, 8)
    lp = torch.log_softmax(logits, -1)
    ref_top, ref_idx = lp.topk(8, -1)
    assert torch.allclose(b.clean_topk_logprobs, ref_top, atol=1e-5)
    # compact KL is a lower bound of the true KL, and close to it
    other = logits + 0.3 * torch.randn_like(logits)
    approx = compact_kl(b.clean_topk_logprobs, b.clean_topk_indices, other)
    exact = full_kl(logits, other)
    assert (approx <= exact + 1e-5).all()


def test_no_logits_fields_are_none_and_batch_moves(tmp_path):
    uri, _, _ = build_tiny(tmp_path / "c")
    b = next(iter(open_cache(uri).sequence_batches("val", 2)))
    assert b.clean_topk_logprobs is None and b.clean_next_token_logprob is None
    moved = b.to("cpu")
    assert torch.equal(moved.tokens, b.tokens) and set(moved.acts) == {"blocks.0.hook_resid_post"}


def test_index_is_one_row_per_real_token(tmp_path):
    uri, _, windows = build_tiny(tmp_path / "c")
    reader = open_cache(uri)
    df = reader.index()
    w = windows["train"]
    train = df[df.split == "train"].sort_values(["sequence", "position"])
    assert len(train) == int(w.attention_mask.sum())
    rows, pos = np.nonzero(w.attention_mask)
    assert (train.token_id.to_numpy() == w.tokens[rows, pos]).all()
    assert (train.train_mask.to_numpy() == (w.tokens[rows, pos] != BOS)).all()
    assert int(df.query("split == 'val'").shape[0]) == int(windows["val"].attention_mask.sum())
    assert set(train.shard) == set(range(len(reader.manifest["splits"]["train"]["shards"])))
    assert reader.num_tokens("train") == int(train.train_mask.sum())


def test_sequence_batches_shuffle_is_a_permutation_and_resumes(tmp_path):
    uri, _, windows = build_tiny(tmp_path / "c")
    reader = open_cache(uri)
    plain = [int(s) for b in reader.sequence_batches("train", 3) for s in b.sequence]
    assert plain == list(range(23))
    shuf = list(reader.sequence_batches("train", 3, shuffle=True, seed=4))
    order = [int(s) for b in shuf for s in b.sequence]
    assert sorted(order) == plain and order != plain
    again = [int(s) for b in reader.sequence_batches("train", 3, shuffle=True, seed=4)
             for s in b.sequence]
    assert again == order
    resumed = list(reader.sequence_batches("train", 3, shuffle=True, seed=4, start_batch=2))
    assert len(resumed) == len(shuf) - 2
    for x, y in zip(shuf[2:], resumed):
        assert torch.equal(x.tokens, y.tokens)
        assert torch.equal(x.acts["blocks.0.hook_resid_post"], y.acts["blocks.0.hook_resid_post"])
        w = windows["train"]
        assert torch.equal(y.tokens, torch.from_numpy(w.tokens[y.sequence.numpy()]))


def test_excluded_token_ids_kept_bos_and_shard_mb(tmp_path):
    windows = {"train": random_windows(12, seed=3), "val": random_windows(2, seed=4)}
    common = windows["train"].tokens[windows["train"].attention_mask & (windows["train"].tokens != BOS)]
    excluded = int(np.bincount(common).argmax())  # the commonest real token id
    # one window of 16 positions of float32 64-d activations is 4 KiB; 0.01 MB -> 2 per shard
    uri, _, _ = build_tiny(tmp_path / "c", windows=windows, exclude_bos=False,
                           exclude_token_ids=(excluded,), shard_tokens=None, shard_mb=0.01)
    reader = open_cache(uri)
    assert [r["num_sequences"] for r in reader.manifest["splits"]["train"]["shards"]] == [2] * 6
    b = next(iter(reader.sequence_batches("train", 12)))
    want = b.attention_mask & (b.tokens != excluded)
    assert torch.equal(b.train_mask, want)
    assert b.train_mask[:, 0].all()  # BOS kept
    assert reader.manifest["excluded"] == {"padding": True, "bos": False, "bos_token_id": BOS,
                                           "pad_token_id": 0, "token_ids": [excluded]}
