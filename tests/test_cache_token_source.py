"""The token source: train-mask rows only, shuffled across shards, deterministic, resumable."""

import pytest
import torch

from _cache_helpers import build_tiny, random_windows, tiny_model
from activation_cache.cache_errors import CacheMismatchError
from activation_cache.reader import open_cache

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    windows = {"train": random_windows(40, seed=5), "val": random_windows(6, seed=6, first_doc=50)}
    uri, _, windows = build_tiny(tmp_path_factory.mktemp("c") / "cache", windows=windows)
    model, _ = tiny_model()
    w = windows["train"]
    with torch.inference_mode():
        _, c = model.run_with_cache(torch.from_numpy(w.tokens),
                                    attention_mask=torch.from_numpy(w.attention_mask).long(),
                                    names_filter=[HOOK])
    acts = c[HOOK]
    keep = torch.from_numpy(w.attention_mask & (w.tokens != 1))
    shard_of = torch.arange(len(w))[:, None].expand(-1, 16) // 4  # 4 windows per shard
    return open_cache(uri), acts, keep, shard_of


def rows_key(t):
    return sorted(map(tuple, t.tolist()))


def test_yields_exactly_the_train_mask_tokens(cache):
    reader, acts, keep, _ = cache
    src = reader.token_source(HOOK, shuffle_buffer_tokens=100)
    assert src.d_in == 64 and src.num_tokens == int(keep.sum())
    batches = list(src.iter_batches(64, seed=0, epoch=0))
    assert all(b.shape == (64, 64) and b.dtype == torch.float32 for b in batches[:-1])
    assert 0 < len(batches[-1]) <= 64
    got = torch.cat(batches)
    assert rows_key(got) == rows_key(acts[keep])
    bos_row = acts[0, 0]  # position 0 only sees BOS: the same vector in every window
    assert not (got == bos_row).all(-1).any()
    padding = acts[~torch.from_numpy(reader_mask(reader))]
    assert len(padding) > 0 and not any((got == row).all(-1).any() for row in padding[:20])


def reader_mask(reader):
    b = next(iter(reader.sequence_batches("train", 1000)))
    return b.attention_mask.numpy()


def test_deterministic_for_seed_and_epoch_and_different_across_epochs(cache):
    reader, *_ = cache
    src = reader.token_source(HOOK, shuffle_buffer_tokens=100)
    a = torch.cat(list(src.iter_batches(50, seed=3, epoch=1)))
    b = torch.cat(list(src.iter_batches(50, seed=3, epoch=1)))
    c = torch.cat(list(src.iter_batches(50, seed=3, epoch=2)))
    d = torch.cat(list(src.iter_batches(50, seed=4, epoch=1)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert rows_key(a) == rows_key(c)


@pytest.mark.parametrize("buffer", [100, 10_000])
def test_resume_from_any_batch_gives_the_same_batches(cache, buffer):
    reader, *_ = cache
    src = reader.token_source(HOOK, shuffle_buffer_tokens=buffer)
    full = list(src.iter_batches(37, seed=1, epoch=0))
    for n in (0, 1, 2, 5, len(full) - 1, len(full)):
        resumed = list(src.iter_batches(37, seed=1, epoch=0, start_batch=n))
        assert len(resumed) == len(full) - n
        assert all(torch.equal(x, y) for x, y in zip(full[n:], resumed)), n


def test_shuffle_buffer_mixes_shards(cache):
    reader, acts, keep, shard_of = cache
    lookup = {tuple(r): int(s) for r, s in zip(acts[keep].tolist(), shard_of[keep].tolist())}
    src = reader.token_source(HOOK, shuffle_buffer_tokens=200)  # ~4 shards of ~50 tokens
    first = next(iter(src.iter_batches(32, seed=0, epoch=0)))
    shards = {lookup[tuple(r)] for r in first.tolist()}
    assert len(shards) >= 3
    # and the chunks cover every shard once per epoch
    groups = src.chunks(0, 0)
    assert sorted(s for g in groups for s in g) == list(range(len(src.shards)))
    assert len(groups) > 1


def test_token_source_errors(cache):
    reader, *_ = cache
    with pytest.raises(CacheMismatchError, match="hook 'blocks.1.hook_resid_post' is not in"):
        reader.token_source("blocks.1.hook_resid_post")
    with pytest.raises(CacheMismatchError, match="d_in=64 in this cache, but 128"):
        reader.token_source(HOOK, d_in=128)
    with pytest.raises(CacheMismatchError, match="unknown split"):
        reader.token_source(HOOK, split="test")
    assert reader.token_source(HOOK, split="val").num_tokens > 0


def test_val_split_left_out_when_empty(tmp_path):
    w = random_windows(8, seed=9)
    empty = random_windows(0, seed=9)
    uri, _, _ = build_tiny(tmp_path / "c", windows={"train": w, "val": empty}, val_fraction=0.0)
    reader = open_cache(uri)
    assert set(reader.manifest["splits"]) == {"train"}
    with pytest.raises(CacheMismatchError, match="has no 'val' split"):
        reader.token_source(HOOK, split="val")


def test_a_shuffle_buffer_of_zero_tokens_is_refused(cache):
    from activation_cache import CacheInputError

    reader = cache[0]
    for bad in (0, -5, 2.5):
        with pytest.raises(CacheInputError, match=r"shuffle_buffer_tokens: must be an integer >= 1"):
            reader.token_source(HOOK, shuffle_buffer_tokens=bad)
