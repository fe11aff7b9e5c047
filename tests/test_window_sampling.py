"""Windows sampled across documents (cache format 2): ranks, max_tokens, old formats, the demo."""

import json
import logging
import os

import numpy as np
import pytest

from activation_cache import (CacheConfig, CacheExistsError, CorpusSpec, ModelSpec, build_cache,
                              open_cache)
from activation_cache.window_sampling import (prefix_for_budget, rank_order, split_budgets,
                                              window_numbers, window_ranks)

HOOK = "blocks.0.hook_resid_post"


def _layout(sizes):
    """doc_index of documents with ``sizes`` windows each, laid out one document after another."""
    return np.repeat(np.arange(len(sizes)), sizes)


# -- ranks -------------------------------------------------------------------------------------

def test_window_numbers_count_within_each_document():
    assert window_numbers(_layout([3, 1, 2])).tolist() == [0, 1, 2, 0, 0, 1]
    assert window_numbers(np.array([5, 5, 2, 2, 2])).tolist() == [0, 1, 0, 1, 2]
    assert window_numbers(np.zeros(0, dtype=np.int64)).tolist() == []


def test_ranks_are_deterministic_keyed_on_the_seed_and_the_document_ids():
    keys, doc = [f"doc{i}" for i in range(5)], _layout([4, 4, 4, 4, 4])
    a = window_ranks(keys, doc, seed=0)
    assert np.array_equal(a, window_ranks(keys, doc, seed=0))
    assert not np.array_equal(a, window_ranks(keys, doc, seed=1))
    assert len(np.unique(a)) == len(a)
    order = rank_order(keys, doc, 0)
    assert sorted(order.tolist()) == list(range(20))
    assert np.all(np.diff(a[order].astype(np.float64)) >= 0)


def test_adding_a_document_keeps_the_other_windows_ranks_and_only_moves_the_cut():
    keys = [f"play{i}" for i in range(12)]
    sizes = [5 + i % 4 for i in range(12)]
    before = window_ranks(keys, _layout(sizes), 3)
    # the new document comes first in corpus order: every other document's index shifts by one
    after = window_ranks(["a new play"] + keys, _layout([7] + sizes), 3)
    assert np.array_equal(after[7:], before)

    def kept(k, s, n):  # the (document, window number) pairs of the n lowest-ranked windows
        doc = _layout(s)
        order = rank_order(k, doc, 3)[:n]
        return {(k[doc[i]], int(window_numbers(doc)[i])) for i in order}

    old = kept(keys, sizes, 20)
    new = kept(["a new play"] + keys, [7] + sizes, 20)
    from_new = {w for w in new if w[0] == "a new play"}
    assert from_new  # the new play gets its share
    # the old documents lose exactly as many windows as the new one gained, and nothing else
    assert new - from_new <= old and len(old - new) == len(from_new)


def test_the_windows_kept_are_spread_over_the_documents_and_nested():
    keys, sizes = [f"d{i:02d}" for i in range(30)], [20] * 30
    doc = _layout(sizes)
    order = rank_order(keys, doc, 0)
    # 30 windows out of 600: in document order they would be 1.5 documents
    assert len(np.unique(doc[order[:30]])) >= 15
    # the chosen windows are not the documents' first windows
    assert window_numbers(doc)[order[:30]].mean() > 5
    # a larger budget keeps a superset (rank order is one list; budgets take its prefixes)
    assert set(order[:30]) < set(order[:90])


def test_budgets_split_in_proportion_and_prefixes_hold_the_budget():
    assert split_budgets(48_000, 0.15, 0.15) == {"train": 33_600, "val": 7_200, "test": 7_200}
    assert split_budgets(100, 0.25, 0.0) == {"train": 75, "val": 25, "test": 0}
    lengths = np.array([10, 4, 10, 10])
    assert prefix_for_budget(lengths, 0) == 0
    assert prefix_for_budget(lengths, 10) == 1
    assert prefix_for_budget(lengths, 11) == 2
    assert prefix_for_budget(lengths, 14) == 2
    assert prefix_for_budget(lengths, 1000) == 4


# -- caches ------------------------------------------------------------------------------------

def _jsonl_corpus(folder, n_docs, words=60, extra=()):
    """Documents with stable ids (an id column), so ranks do not depend on where tmp_path is."""
    rng = np.random.default_rng(0)
    vocab = "the a king queen sword crown night day love war peace storm sea land".split()
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"doc{i:02d}", "text": " ".join(rng.choice(vocab, size=words))}
            for i in range(n_docs)]
    # extra documents come first: every other document's position in the corpus shifts
    rows = [{"id": i, "text": " ".join(rng.choice(vocab, size=words))} for i in extra] + rows
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return CorpusSpec(source="jsonl", paths=(str(folder),), id_column="id")


def _config(tmp_path, out, corpus, **overrides):
    fields = dict(output=str(tmp_path / out), model=ModelSpec(source="tiny", n_ctx=64),
                  corpus=corpus, hooks=(HOOK,), max_text_length=32, shard_tokens=32 * 4,
                  batch_size=8, dtype="float32", val_fraction=0.2, test_fraction=0.2)
    fields.update(overrides)
    return CacheConfig(**fields)


def _windows_by_document(reader, split):
    """{(doc_id, tokens of the window)} of a split, read through the public reader."""
    return {(int(d), tuple(t)) for b in reader.sequence_batches(split, 16)
            for d, t in zip(b.doc_id.tolist(), b.tokens.tolist())}


def test_max_tokens_samples_every_split_across_its_documents(tmp_path, one_thread):
    corpus = _jsonl_corpus(tmp_path / "corpus", 20)
    full = open_cache(build_cache(_config(tmp_path, "full", corpus)))
    capped = open_cache(build_cache(_config(tmp_path, "capped", corpus, max_tokens=1500)))
    m = capped.manifest
    assert m["version"] == 2 and m["window_order"] == "sampled across documents"
    budgets = split_budgets(1500, 0.2, 0.2)
    for split in ("train", "val", "test"):
        info, whole = m["splits"][split], full.manifest["splits"][split]
        # the budget, reached with the fewest windows (the last one may overshoot)
        assert budgets[split] <= info["num_tokens"] < budgets[split] + 32
        kept = _windows_by_document(capped, split)
        assert kept <= _windows_by_document(full, split)  # windows of this split, unchanged
        docs = {d for d, _ in kept}
        assert info["num_documents"] == len(docs) and whole["num_documents"] == 4 * (
            1 if split != "train" else 3)
        assert len(docs) >= min(whole["num_documents"], 3)   # not the first document or two
        # the per-token index agrees with the windows
        index = capped.index(split)
        per_window = index.groupby("sequence")["doc_id"].first().tolist()
        assert per_window == [int(d) for b in capped.sequence_batches(split, 64)
                              for d in b.doc_id.tolist()]
        assert len(index) == info["num_tokens"]
    # the full cache's leading windows are the capped cache's windows (one rank order)
    for split in ("train", "val"):
        n = m["splits"][split]["num_sequences"]
        a = next(iter(capped.sequence_batches(split, n)))
        b = next(iter(full.sequence_batches(split, n)))
        assert a.tokens.equal(b.tokens) and a.acts[HOOK].equal(b.acts[HOOK])


def test_a_new_document_leaves_the_others_windows_alone_but_for_the_cut(tmp_path, one_thread):
    def train_windows(out, corpus):
        cfg = _config(tmp_path, out, corpus, val_fraction=0.0, test_fraction=0.0,
                      max_tokens=900)
        reader = open_cache(build_cache(cfg))
        names = {i: doc.doc_id for i, doc in enumerate(_load(corpus))}
        return {(names[d], t) for d, t in _windows_by_document(reader, "train")}

    old = train_windows("old", _jsonl_corpus(tmp_path / "c1", 16))
    new = train_windows("new", _jsonl_corpus(tmp_path / "c2", 16, extra=["zz new"]))
    from_new = {w for w in new if w[0] == "zz new"}
    kept_old = new - from_new
    assert kept_old <= old                                # nothing reshuffled
    assert len(old - kept_old) <= len(from_new) + 1       # only displaced by the new windows


def _load(corpus):
    from activation_cache import load_corpus
    return load_corpus(corpus)


def _as_format_1(folder):
    """Rewrite a finished cache's manifest as cache format 1 wrote it."""
    path = os.path.join(folder, "manifest.json")
    m = json.load(open(path))
    m["version"] = 1
    del m["window_order"]
    open(path, "w").write(json.dumps(m))


def test_a_format_1_cache_stays_readable_and_says_what_it_is(tmp_path, caplog, one_thread):
    cfg = _config(tmp_path, "old", _jsonl_corpus(tmp_path / "corpus", 8), max_tokens=400)
    uri = build_cache(cfg)
    _as_format_1(uri)
    reader = open_cache(uri)
    assert reader.manifest["window_order"] == "document order"
    assert len(list(reader.sequence_batches("train", 4))) > 0
    with caplog.at_level(logging.INFO, logger="activation_cache"):
        assert build_cache(cfg) == uri                    # reused, with a warning that says why
    said = [r for r in caplog.records if "already complete" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "windows in document order (format 1)" in said[0].getMessage()
    assert "--overwrite" in said[0].getMessage()


def test_resuming_a_format_1_partial_build_is_refused_in_one_line(tmp_path, no_model_load):
    cfg = _config(tmp_path, "partial", _jsonl_corpus(tmp_path / "corpus", 8))
    out = tmp_path / "partial"
    out.mkdir()
    (out / "build.json").write_text(json.dumps(
        {"format": "sae-sweep/activation-cache", "version": 1, "config": cfg.to_dict(),
         "model": {}}))
    with pytest.raises(CacheExistsError, match=r"started in cache format 1 \(document order\)"
                       r".*use another output or overwrite") as err:
        build_cache(cfg)
    assert "\n" not in str(err.value)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model (checks must come before it)."""
    import activation_cache.builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(builder, "load_model", refuse)


def test_the_demo_cache_spans_many_plays_in_every_split_without_warnings(tmp_path, caplog,
                                                                          one_thread):
    """The demo's cache config (Shakespeare, its max_tokens and split fractions) on the tiny
    model with the byte tokenizer: several plays in every split, no data warning."""
    from sweep.demo import DEMO_CACHE_TOKENS, demo_cache_config

    tiny = ModelSpec(source="tiny", n_ctx=128)
    cfg = demo_cache_config(tmp_path, model=tiny, hooks=(HOOK,), shard_tokens=128 * 64,
                            batch_size=32, dtype="float32")
    assert cfg.max_tokens == DEMO_CACHE_TOKENS and cfg.corpus.source == "shakespeare"
    with caplog.at_level(logging.WARNING, logger="activation_cache"):
        m = open_cache(build_cache(cfg)).manifest
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert set(m["splits"]) == {"train", "val", "test"}
    for split, info in m["splits"].items():
        assert info["num_documents"] >= (20 if split == "train" else 5), (split, info)
