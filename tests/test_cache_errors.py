"""Every bad input gets a UserError that names the file (or field) and the problem."""

import json
import os
import re

import pytest

from _cache_helpers import build_tiny, random_windows, tiny_config, tiny_model
from activation_cache.builder import build_from_windows
from activation_cache.cache_config import CacheConfig
from activation_cache.cache_errors import (
    CacheError, CacheExistsError, CacheInputError, CacheMismatchError, CorruptCacheError,
)
from activation_cache.errors import UserError
from activation_cache.reader import open_cache
from activation_cache.strict_config import ConfigError

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture()
def built(tmp_path):
    uri, cfg, windows = build_tiny(tmp_path / "c")
    return uri, cfg, windows, json.loads(open(os.path.join(uri, "manifest.json")).read())


def first_shard(manifest):
    return manifest["splits"]["train"]["shards"][0]


def test_corrupted_shard_fails_its_checksum_on_first_read(built):
    uri, _, _, m = built
    rec = first_shard(m)
    path = os.path.join(uri, rec["file"])
    entry = rec["tensors"][f"acts.{HOOK}"]
    with open(path, "r+b") as f:  # same size, one flipped byte inside the activations
        f.seek(entry["offset"] + 5)
        byte = f.read(1)
        f.seek(entry["offset"] + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    reader = open_cache(uri)  # sizes are fine: open succeeds
    with pytest.raises(CorruptCacheError) as err:
        list(reader.token_source(HOOK).iter_batches(8, seed=0, epoch=0))
    assert path in str(err.value) and "sha256" in str(err.value)
    with pytest.raises(CorruptCacheError, match="sha256"):
        open_cache(uri).verify()
    with pytest.raises(CorruptCacheError, match="sha256"):  # the whole-window path as well
        list(open_cache(uri).sequence_batches("train", 4))
    # opting out of hashing is allowed: the (corrupted) data is read without a check
    unchecked = open_cache(uri, verify=False)
    assert len(list(unchecked.token_source(HOOK).iter_batches(8, seed=0, epoch=0))) > 0
    assert len(list(unchecked.sequence_batches("train", 4))) > 0


def test_truncated_and_missing_shards_fail_at_open(built):
    uri, _, _, m = built
    rec = first_shard(m)
    path = os.path.join(uri, rec["file"])
    with open(path, "r+b") as f:
        f.truncate(rec["bytes"] - 10)
    with pytest.raises(CorruptCacheError) as err:
        open_cache(uri)
    assert path in str(err.value) and "truncated" in str(err.value)
    os.unlink(path)
    with pytest.raises(CorruptCacheError, match="missing"):
        open_cache(uri)


def test_bad_or_missing_manifest(built, tmp_path):
    uri, _, _, m = built
    man = os.path.join(uri, "manifest.json")
    m2 = dict(m)
    m2["splits"] = {"train": dict(m["splits"]["train"])}
    m2["splits"]["train"]["shards"] = m["splits"]["train"]["shards"][1:]
    open(man, "w").write(json.dumps(m2))
    with pytest.raises(CorruptCacheError, match="manifest.json: shard train-00001: starts at"):
        open_cache(uri)
    m3 = dict(m)
    m3["d_in"] = {HOOK: 65}
    open(man, "w").write(json.dumps(m3))
    with pytest.raises(CorruptCacheError, match="does not match seq_len=16 and d_in=65"):
        open_cache(uri)
    open(man, "w").write("{not json")
    with pytest.raises(CorruptCacheError, match="manifest.json: not valid JSON"):
        open_cache(uri)
    os.unlink(man)
    with pytest.raises(CacheError, match="did not finish"):
        open_cache(uri)
    with pytest.raises(CacheError, match="is not an activation cache"):
        open_cache(str(tmp_path / "nothing"))


def test_window_longer_than_context_and_unknown_hook(tmp_path):
    with pytest.raises(CacheInputError, match="longer than the model's context n_ctx=32"):
        build_tiny(tmp_path / "a", windows={"train": random_windows(4, seq=40),
                                            "val": random_windows(0, seq=40)},
                   max_text_length=40)
    with pytest.raises(CacheInputError, match=r"hooks: hook 'blocks.7.hook_resid_post': layer 7 "
                                              r"is out of range: the model has layers 0-1"):
        build_tiny(tmp_path / "b", hooks=("blocks.7.hook_resid_post",))
    with pytest.raises(CacheInputError, match="larger than the vocabulary"):
        build_tiny(tmp_path / "c", store_logits=True, logits_top_k=1000)


def test_empty_corpus(tmp_path):
    empty = random_windows(0)
    with pytest.raises(CacheInputError, match="no training windows"):
        build_tiny(tmp_path / "c", windows={"train": empty, "val": empty})


def test_different_config_is_refused_unless_overwrite(built):
    uri, cfg, windows, m = built
    model, ident = tiny_model()
    # same config: the complete cache is reused as is (nothing rebuilt)
    from activation_cache.builder import _check_existing
    from activation_cache.storage import Storage
    assert _check_existing(cfg, Storage(uri), overwrite=False) is True
    other = cfg.replace(dtype="float16")
    with pytest.raises(CacheExistsError) as err:
        _check_existing(other, Storage(uri), overwrite=False)
    assert "differs in: dtype" in str(err.value) and "build.json" in str(err.value)
    assert _check_existing(other, Storage(uri), overwrite=True) is False
    assert os.listdir(uri) == []
    build_from_windows(other, model, ident, windows)
    assert open_cache(uri).manifest["act_dtype"] == "float16"


def test_non_cache_folder_is_not_overwritten_silently(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    from activation_cache.builder import _check_existing
    from activation_cache.storage import Storage
    with pytest.raises(CacheExistsError, match="not empty and not a cache"):
        _check_existing(tiny_config(tmp_path / "c"), Storage(str(tmp_path / "c")), overwrite=False)


def test_model_identity_mismatch(built):
    uri, *_ = built
    reader = open_cache(uri)
    _, ident = tiny_model()
    reader.check_model(ident)
    with pytest.raises(CacheMismatchError, match="another model"):
        reader.check_model({**ident, "d_model": 128})


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"CacheConfig.dtype: must be one of"):
        CacheConfig(dtype="int8")
    with pytest.raises(ConfigError, match=r"CacheConfig.hooks: listed more than once"):
        CacheConfig(hooks=(HOOK, HOOK))
    with pytest.raises(ConfigError, match=r"CacheConfig.shard_tokens: set exactly one"):
        CacheConfig(shard_mb=10.0)
    with pytest.raises(ConfigError, match=r"CacheConfig.val_fraction"):
        CacheConfig(val_fraction=1.0)
    with pytest.raises(ConfigError, match="unknown key"):
        CacheConfig.from_dict({"hook": HOOK})
    assert issubclass(CacheError, UserError)
    cfg = CacheConfig(output=str(tmp_path), shard_mb=1.5, shard_tokens=None)
    assert CacheConfig.from_yaml(cfg.to_yaml()) == cfg


def test_example_config_parses():
    from pathlib import Path
    cfg = CacheConfig.from_yaml(Path(__file__).parents[1] / "examples" / "cache.yaml")
    assert cfg.model.source == "smollm2" and cfg.corpus.source == "shakespeare"
    assert cfg.hooks == ("blocks.6.hook_resid_post",) and cfg.max_tokens == 20000


# -- what is checked before the model loads -------------------------------------------------------


@pytest.fixture()
def no_model_load(monkeypatch):
    """build_cache fails the test if it loads a model."""
    import activation_cache.builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(builder, "load_model", refuse)


def _text_corpus(folder, n=3):
    from activation_cache import CorpusSpec

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(f"document {i}: to be or not to be")
    return CorpusSpec(source="files", paths=(str(folder),))


@pytest.mark.parametrize("hook, message", [
    ("blocks.1.hook_mlpout", r"unknown hook 'blocks\.1\.hook_mlpout'; did you mean "
                             r"blocks\.1\.hook_mlp_out"),
    ("blocks.99.hook_resid_post", r"hook 'blocks\.99\.hook_resid_post': layer 99 is out of range: "
                                  r"the model has layers 0-1 .*"
                                  r"e\.g\. blocks\.1\.hook_resid_post"),
    ("resid_post.1", r"'resid_post\.1' is not a transformer_lens hook name; did you mean "
                     r"blocks\.1\.hook_resid_post\?"),
])
def test_hook_typos_get_suggestions_before_the_model_loads(tmp_path, no_model_load, hook,
                                                           message):
    from activation_cache import ModelSpec, build_cache

    cfg = CacheConfig(output=str(tmp_path / "cache"), model=ModelSpec(source="tiny"),
                      corpus=_text_corpus(tmp_path / "texts"), hooks=(hook,))
    with pytest.raises(CacheInputError, match=r"^CacheConfig\.hooks: " + message):
        build_cache(cfg)


def test_corpus_errors_come_before_the_model_loads(tmp_path, no_model_load):
    from activation_cache import CorpusError, CorpusSpec, ModelSpec, build_cache

    def cfg(corpus):
        return CacheConfig(output=str(tmp_path / "cache"), model=ModelSpec(source="tiny"),
                           corpus=corpus, hooks=(HOOK,))

    with pytest.raises(CorpusError, match=r"paths: .*nowhere does not exist"):
        build_cache(cfg(CorpusSpec(source="files", paths=(str(tmp_path / "nowhere"),))))
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("   \n\n ")
    with pytest.raises(CorpusError, match="the corpus is empty"):
        build_cache(cfg(CorpusSpec(source="files", paths=(str(blank),))))


def test_config_hook_names_are_the_loaded_models(tmp_path):
    from activation_cache import ModelSpec, load_model
    from activation_cache.model_loading import config_hook_names

    from activation_cache.hook_names import active_hook_names

    spec = ModelSpec(source="tiny", tiny_n_layers=3)
    names, n_layers = config_hook_names(spec)
    model = load_model(spec)
    assert n_layers == 3 and names == sorted(active_hook_names(model.hook_dict, model.cfg))


@pytest.mark.model
def test_smollm2_hook_typos_from_its_gguf_metadata_before_any_load(tmp_path, no_model_load,
                                                                   monkeypatch):
    from activation_cache import ModelSpec, build_cache

    monkeypatch.setenv("SAE_SWEEP_CACHE_DIR", str(tmp_path / "fresh"))  # nothing converted yet
    for hook, message in (("blocks.3.hook_mlpout", r"did you mean blocks\.3\.hook_mlp_out"),
                          ("blocks.99.hook_resid_post", r"the model has layers 0-29")):
        cfg = CacheConfig(output=str(tmp_path / "cache"), model=ModelSpec(),
                          corpus=_text_corpus(tmp_path / "texts"), hooks=(hook,))
        with pytest.raises(CacheInputError, match=message):
            build_cache(cfg)
    assert not (tmp_path / "fresh" / "models").exists()   # no conversion either


def test_a_split_of_few_documents_is_warned_about(tmp_path, caplog):
    import logging

    from activation_cache import ModelSpec, build_cache

    cfg = CacheConfig(output=str(tmp_path / "cache"), model=ModelSpec(source="tiny", n_ctx=64),
                      corpus=_text_corpus(tmp_path / "texts", n=6), hooks=(HOOK,),
                      max_text_length=16, val_fraction=0.2, test_fraction=0.0, dtype="float32")
    with caplog.at_level(logging.WARNING, logger="activation_cache"):
        build_cache(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["CacheConfig.corpus: the val split comes from only 1 document: its "
                        "statistics may not generalise\n  (add documents or split long "
                        "texts into several files)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="activation_cache"):   # 12 documents, capped
        build_cache(cfg.replace(output=str(tmp_path / "capped"), max_tokens=40, val_fraction=0.5,
                                corpus=_text_corpus(tmp_path / "texts12", n=12)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("max_tokens keeps" in w for w in warnings)
    assert all(re.search(r"keeps \d+ of its tokens, sampled from \d of its 6 documents", w)
               for w in warnings)
