"""The token source: train-mask rows only, shuffled across shards, deterministic, resumable."""

import math
from collections import Counter

import numpy as np
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


def inputs(batches):
    """The input rows of one hook's batches (whose target is the input tensor itself)."""
    out = []
    for b in batches:
        assert b.target is b.input  # one hook: one tensor, no copy
        out.append(b.input)
    return out


def test_yields_exactly_the_train_mask_tokens(cache):
    reader, acts, keep, _ = cache
    src = reader.token_source(HOOK, shuffle_buffer_tokens=100)
    assert src.d_in == 64 and src.num_tokens == int(keep.sum())
    batches = inputs(src.iter_batches(64, seed=0, epoch=0))
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
    a = torch.cat(inputs(src.iter_batches(50, seed=3, epoch=1)))
    b = torch.cat(inputs(src.iter_batches(50, seed=3, epoch=1)))
    c = torch.cat(inputs(src.iter_batches(50, seed=3, epoch=2)))
    d = torch.cat(inputs(src.iter_batches(50, seed=4, epoch=1)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert rows_key(a) == rows_key(c)


@pytest.mark.parametrize("buffer", [100, 10_000])
def test_resume_from_any_batch_gives_the_same_batches(cache, buffer):
    reader, *_ = cache
    src = reader.token_source(HOOK, shuffle_buffer_tokens=buffer)
    full = inputs(src.iter_batches(37, seed=1, epoch=0))
    for n in (0, 1, 2, 5, len(full) - 1, len(full)):
        resumed = inputs(src.iter_batches(37, seed=1, epoch=0, start_batch=n))
        assert len(resumed) == len(full) - n
        assert all(torch.equal(x, y) for x, y in zip(full[n:], resumed)), n


def test_shuffle_buffer_mixes_shards(cache):
    reader, acts, keep, shard_of = cache
    lookup = {tuple(r): int(s) for r, s in zip(acts[keep].tolist(), shard_of[keep].tolist())}
    src = reader.token_source(HOOK, shuffle_buffer_tokens=200)  # ~4 shards of ~50 tokens
    first = next(iter(src.iter_batches(32, seed=0, epoch=0))).input
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
    with pytest.raises(CacheMismatchError, match="unknown split 'dev': use one of train, val, test"):
        reader.token_source(HOOK, split="dev")
    with pytest.raises(CacheMismatchError, match="has no 'test' split"):
        reader.token_source(HOOK, split="test")  # built from windows without a test split
    assert reader.token_source(HOOK, split="val").num_tokens > 0


def test_val_split_left_out_when_empty(tmp_path):
    w = random_windows(8, seed=9)
    empty = random_windows(0, seed=9)
    uri, _, _ = build_tiny(tmp_path / "c", windows={"train": w, "val": empty}, val_fraction=0.0)
    reader = open_cache(uri)
    assert set(reader.manifest["splits"]) == {"train"}
    with pytest.raises(CacheMismatchError, match="has no 'val' split"):
        reader.token_source(HOOK, split="val")


# -- the block shuffle: speed without letting one window dominate a batch --------------------

MIX_SEQ = 32  # 31 train tokens a window (BOS excluded); every other window is padded shorter


@pytest.fixture(scope="module")
def mix_cache(tmp_path_factory):
    """600 windows in fp16, 20 windows a shard, and where each stored row comes from."""
    windows = {"train": random_windows(600, seed=21, seq=MIX_SEQ),
               "val": random_windows(0, seed=21, seq=MIX_SEQ)}
    uri, _, _ = build_tiny(tmp_path_factory.mktemp("mix") / "cache", windows=windows,
                           val_fraction=0.0, max_text_length=MIX_SEQ, dtype="float16",
                           shard_tokens=MIX_SEQ * 20, batch_size=50)
    reader = open_cache(uri)
    whole = next(iter(reader.sequence_batches("train", 10_000)))
    acts = whole.acts[HOOK].numpy()
    where = {}  # row bytes -> (window, position); None when two rows are equal
    for w in range(len(whole)):
        for p in np.flatnonzero(whole.train_mask[w].numpy()):
            key = acts[w, p].tobytes()
            where[key] = None if key in where else (int(whole.sequence[w]), int(p))
    return reader, where


def provenance(batch, where):
    """(window, position) of every row whose value is unique in the cache."""
    rows = [where[r.tobytes()] for r in batch.float().numpy()]
    return [r for r in rows if r is not None]


def test_block_shuffle_bounds_the_share_of_one_window_in_a_batch(mix_cache):
    reader, where = mix_cache
    B, b = 256, 8
    src = reader.token_source(HOOK, shuffle_buffer_tokens=reader.num_tokens(), block_tokens=b)
    N, n_windows = src.num_tokens, reader.num_sequences()
    m = math.ceil((MIX_SEQ - 1) / b)  # most blocks a window has
    batches = inputs(src.iter_batches(B, seed=0, epoch=0))[:-1]  # the full ones
    assert len(src.chunks(0, 0)) == 1 and len(batches) > 40
    # The documented bound: one window supplies more than k blocks to a batch with probability
    # at most C(m, k+1) (B/N)^(k+1). For k = 3 summed over every window and batch it is < 1%:
    # more than 3 blocks here would be a defect, not bad luck.
    q = B / N
    assert math.comb(m, 4) * q ** 4 * n_windows * len(batches) < 0.01
    shares, doubled = [], 0
    for batch in batches:
        counts = Counter(w for w, _ in provenance(batch, where))
        shares.append(max(counts.values()) / B)
        doubled += sum(c > b for c in counts.values())  # certainly 2+ blocks of one window
    assert max(shares) <= 3 * b / B  # <= 9.4% of a batch
    # windows supplying 2+ blocks: no more often than a uniform draw of blocks allows
    # (expected at most C(m, 2) q^2 per window and batch); clustering would be ~every window
    assert doubled <= 2 * math.comb(m, 2) * q ** 2 * n_windows * len(batches)


def test_block_shuffle_batches_are_many_short_runs_from_many_shards(mix_cache):
    reader, where = mix_cache
    B, b = 256, 8
    src = reader.token_source(HOOK, shuffle_buffer_tokens=reader.num_tokens(), block_tokens=b)
    long_runs = 0
    for batch in inputs(src.iter_batches(B, seed=1, epoch=0))[:-1]:
        rows = provenance(batch, where)
        windows = {w for w, _ in rows}
        # a batch is about B/b blocks of different windows; reading in order would give ~B/T
        assert len(windows) >= 0.75 * B / b
        assert len({w // 20 for w in windows}) >= 8  # shards
        run = 1
        for (w0, p0), (w1, p1) in zip(rows, rows[1:]):
            run = run + 1 if (w1, p1) == (w0, p0 + 1) else 1
            long_runs += run == b + 1
    # consecutive positions of one window come in blocks of <= b; two blocks of a window land
    # next to each other in order only by chance (about once an epoch here)
    assert long_runs <= 3


def test_mixing_buffers_hold_at_least_the_buffer_size(mix_cache):
    reader, _ = mix_cache
    src = reader.token_source(HOOK, shuffle_buffer_tokens=2000)
    tokens = {i: r["num_train_tokens"] for i, r in enumerate(src.shards)}
    for seed in range(3):
        groups = src.chunks(seed, 0)
        assert sorted(s for g in groups for s in g) == list(range(len(src.shards)))
        assert all(sum(tokens[s] for s in g) >= 2000 for g in groups) and len(groups) > 2


def test_batches_as_stored_are_the_float32_batches_unconverted(mix_cache):
    reader, _ = mix_cache
    as_f32 = reader.token_source(HOOK, shuffle_buffer_tokens=3000)
    as_stored = reader.token_source(HOOK, shuffle_buffer_tokens=3000, dtype=None)
    assert as_f32.dtype == torch.float32 and as_stored.dtype == torch.float16
    a = inputs(as_f32.iter_batches(300, seed=2, epoch=1))
    s = inputs(as_stored.iter_batches(300, seed=2, epoch=1))
    assert len(a) == len(s) and all(x.dtype == torch.float16 for x in s)
    assert all(torch.equal(x.float(), y) for x, y in zip(s, a))
    resumed = inputs(as_stored.iter_batches(300, seed=2, epoch=1, start_batch=7))
    assert all(torch.equal(x, y) for x, y in zip(s[7:], resumed))


def test_bfloat16_and_float32_storage_as_stored(tmp_path, cache):
    reader32, *_ = cache
    src = reader32.token_source(HOOK, dtype=None)
    assert src.dtype == torch.float32
    assert all(b.input.dtype == torch.float32 for b in src.iter_batches(64, seed=0, epoch=0))
    uri, _, _ = build_tiny(tmp_path / "bf16", dtype="bfloat16")
    reader = open_cache(uri)
    a = inputs(reader.token_source(HOOK).iter_batches(50, seed=0, epoch=0))
    s = inputs(reader.token_source(HOOK, dtype=None).iter_batches(50, seed=0, epoch=0))
    assert all(x.dtype == torch.bfloat16 for x in s)
    assert all(torch.equal(x.float(), y) for x, y in zip(s, a))


def test_batch_memory_is_recycled_only_once_released(mix_cache):
    reader, _ = mix_cache
    src = reader.token_source(HOOK, shuffle_buffer_tokens=3000, dtype=None, read_ahead_batches=2)
    kept = inputs(src.iter_batches(100, seed=0, epoch=0))  # every batch still referenced
    streamed, pointers = [], set()
    for batch in src.iter_batches(100, seed=0, epoch=0):
        x = batch.input
        pointers.add(x.data_ptr())
        streamed.append(x.clone())  # the batch itself is released
        del batch, x
    assert all(torch.equal(x, y) for x, y in zip(kept, streamed)) and len(kept) == len(streamed)
    assert len({x.data_ptr() for x in kept}) == len(kept)  # none overwritten while held
    assert len(pointers) <= 2 + 4 + 1  # read-ahead + pool slack: memory reused, not reallocated
    views = [b.input[:10] for b in src.iter_batches(100, seed=0, epoch=0)]  # views hold theirs
    assert all(torch.equal(v, x[:10]) for v, x in zip(views, kept))


def test_source_options_are_checked(mix_cache):
    reader, _ = mix_cache
    with pytest.raises(ValueError, match="block_tokens must be an integer >= 1"):
        reader.token_source(HOOK, block_tokens=0)
    with pytest.raises(ValueError, match="dtype must be None"):
        reader.token_source(HOOK, dtype=torch.int8)
    src = reader.token_source(HOOK, pin_memory=True)
    assert src.pin_memory == torch.cuda.is_available()


def test_a_shuffle_buffer_of_zero_tokens_is_refused(cache):
    from activation_cache import CacheInputError

    reader = cache[0]
    for bad in (0, -5, 2.5):
        with pytest.raises(CacheInputError, match=r"shuffle_buffer_tokens: must be an integer >= 1"):
            reader.token_source(HOOK, shuffle_buffer_tokens=bad)


# -- two hooks: a transcoder's input and target, row-aligned ---------------------------------

MLP_IN, MLP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def two_hooks(tmp_path_factory):
    windows = {"train": random_windows(40, seed=5), "val": random_windows(6, seed=6, first_doc=50)}
    uri, _, _ = build_tiny(tmp_path_factory.mktemp("two") / "cache", windows=windows,
                           hooks=(MLP_IN, MLP_OUT), dtype="float16")
    return open_cache(uri)


def test_a_target_hook_gives_the_same_tokens_rows_of_both_hooks(two_hooks):
    reader = two_hooks
    whole = next(iter(reader.sequence_batches("train", 10_000)))
    mask = whole.train_mask.bool()
    pairs = {}
    for x, y in zip(whole.acts[MLP_IN][mask], whole.acts[MLP_OUT][mask]):
        key = tuple(x.tolist())  # equal inputs (one token after BOS) have equal outputs
        assert key not in pairs or torch.equal(pairs[key], y)
        pairs[key] = y
    assert len(pairs) > 0.95 * int(mask.sum())  # an input row names its token
    src = reader.token_source(MLP_IN, target_hook=MLP_OUT, shuffle_buffer_tokens=100)
    assert (src.d_in, src.d_out, src.target_hook) == (64, 64, MLP_OUT)
    batches = list(src.iter_batches(37, seed=2, epoch=1))
    seen = 0
    for b in batches:
        assert b.target is not b.input and b.input.shape == b.target.shape
        for x, y in zip(b.input.float(), b.target):
            assert torch.equal(pairs[tuple(x.tolist())], y)  # the same token's output row
        seen += b.input.shape[0]
    assert seen == src.num_tokens == int(mask.sum())
    # the input side is exactly the one-hook source's stream (one shuffle, shared)
    alone = reader.token_source(MLP_IN, shuffle_buffer_tokens=100)
    assert all(torch.equal(a.input, b.input)
               for a, b in zip(alone.iter_batches(37, seed=2, epoch=1), batches))
    # resumable from any batch, both sides; as stored (fp16) too
    resumed = list(src.iter_batches(37, seed=2, epoch=1, start_batch=3))
    assert all(torch.equal(a.input, b.input) and torch.equal(a.target, b.target)
               for a, b in zip(batches[3:], resumed)) and len(resumed) == len(batches) - 3
    stored = next(iter(reader.token_source(MLP_IN, target_hook=MLP_OUT, dtype=None,
                                           shuffle_buffer_tokens=100).iter_batches(
        37, seed=2, epoch=1)))
    assert stored.input.dtype == stored.target.dtype == torch.float16
    assert torch.equal(stored.target.float(), batches[0].target)
    # the target hook itself, or none, is the one-hook source
    same = reader.token_source(MLP_IN, target_hook=MLP_IN)
    assert same.target_hook is None and same.d_out == same.d_in
    with pytest.raises(CacheMismatchError, match="hook 'blocks.1.hook_mlp_out' is not in"):
        reader.token_source(MLP_IN, target_hook="blocks.1.hook_mlp_out")
