"""build_cache end to end: corpus -> windows -> shards; resume after SIGKILL; Ray; S3; the CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from _cache_helpers import build_tiny, tiny_config, tiny_model, tiny_windows
from activation_cache.builder import build_from_windows
from activation_cache import (CacheConfig, CacheExistsError, WindowedTextDataset,
                              build_cache, load_corpus, open_cache, split_documents)
from activation_cache.window_sampling import rank_order
from sweep.cli import main as cli_main

HOOK = "blocks.0.hook_resid_post"
WORDS = "the a king queen sword crown night day love war peace storm sea land".split()


def write_corpus(folder, n_docs=6, words=40, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS, size=words + 5 * i))
        (folder / f"doc{i:02d}.txt").write_text(text + ".\n")
    return folder


def corpus_config(tmp_path, out="cache", **overrides):
    fields = dict(
        output=str(tmp_path / out), model={"source": "tiny", "n_ctx": 64},
        corpus={"source": "files", "paths": [str(write_corpus(tmp_path / "corpus"))]},
        hooks=[HOOK], max_text_length=32, shard_tokens=32 * 3, batch_size=4, dtype="float32",
        val_fraction=0.25,
    )
    fields.update(overrides)
    return CacheConfig.from_dict(fields)


def shard_digests(uri):
    m = json.load(open(os.path.join(uri, "manifest.json")))
    return [(r["name"], r["sha256"], r["index_sha256"]) for s in m["splits"].values()
            for r in s["shards"]]


def test_build_cache_from_text_files_matches_the_windows(tmp_path):
    cfg = corpus_config(tmp_path)
    uri = build_cache(cfg)
    reader = open_cache(uri)
    m = reader.manifest
    assert m["config"] == cfg.to_dict() and m["model"]["name"].startswith("tiny")
    docs = load_corpus(cfg.corpus)
    train_docs, val_docs, test_docs = split_documents(docs, 0.25, 0, test_fraction=0.1)
    from activation_cache import load_model
    model = load_model(cfg.model)
    for split, split_docs in (("train", train_docs), ("val", val_docs), ("test", test_docs)):
        ds = WindowedTextDataset(split_docs, model.tokenizer, 32, True)
        got = list(reader.sequence_batches(split, 5))
        tokens = torch.cat([b.tokens for b in got])
        # every window of the split once, in rank order (sampled across documents)
        assert sorted(map(tuple, tokens.tolist())) == sorted(map(tuple, ds.tokens.tolist()))
        order = torch.from_numpy(rank_order([d.doc_id for d in split_docs], ds.doc_ids.numpy(), 0))
        assert torch.equal(tokens, ds.tokens[order])
        assert torch.equal(torch.cat([b.train_mask for b in got]), ds.train_mask[order])
        ids = {d.doc_id: i for i, d in enumerate(docs)}
        want_doc = torch.tensor([ids[split_docs[j].doc_id] for j in ds.doc_ids[order]])
        assert torch.equal(torch.cat([b.doc_id for b in got]), want_doc)
        assert m["splits"][split]["num_documents"] == len(split_docs)
        assert m["splits"][split]["num_train_tokens"] == ds.num_train_tokens
        first = ds.tokens[order[:3]], ds.attention_mask[order[:3]].long()
        with torch.inference_mode():
            _, cache = model.run_with_cache(first[0], attention_mask=first[1])
        assert torch.equal(got[0].acts[HOOK][:3], cache[HOOK])
    # a second run with the same config reuses the finished cache
    before = os.stat(os.path.join(uri, "manifest.json")).st_mtime_ns
    assert build_cache(cfg) == uri
    assert os.stat(os.path.join(uri, "manifest.json")).st_mtime_ns == before
    with pytest.raises(CacheExistsError, match="differs in: max_text_length"):
        build_cache(cfg.replace(max_text_length=16))


def test_max_tokens_caps_each_split_in_proportion(tmp_path):
    cfg = corpus_config(tmp_path, max_tokens=120)
    m = open_cache(build_cache(cfg)).manifest
    train, val = m["splits"]["train"]["num_tokens"], m["splits"]["val"]["num_tokens"]
    assert 90 <= train < 90 + 32 and 30 <= val < 30 + 32


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from activation_cache import CacheConfig, build_cache
    from activation_cache.storage import Storage
    original = Storage.write_atomic
    def slow_write(self, rel, data):  # slow the build down so the kill lands mid-build
        original(self, rel, data)
        time.sleep(0.05)
    Storage.write_atomic = slow_write
    build_cache(CacheConfig.from_yaml(sys.argv[1]))
""")


def test_resume_after_sigkill_gives_exactly_the_uninterrupted_cache(tmp_path):
    cfg = corpus_config(tmp_path, out="killed", shard_tokens=32, max_tokens=700,
                        corpus={"source": "files",
                                "paths": [str(write_corpus(tmp_path / "small", n_docs=4))]})
    ref = build_cache(cfg.replace(output=str(tmp_path / "reference")))
    cfg.to_yaml(tmp_path / "cfg.yaml")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cfg.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed" / "parts"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and len(list(parts.glob("*.json"))) < 3:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists(), "build finished before the kill"
    committed = len(list(parts.glob("*.json")))
    total = len(shard_digests(ref))
    assert 3 <= committed < total
    # what a kill at the worst moments leaves: a temp file, and a renamed shard with no record
    (tmp_path / "killed" / "shards" / "val-00000.safetensors.tmp-dead").write_bytes(b"half")
    (tmp_path / "killed" / "shards" / "val-00000.safetensors").write_bytes(b"not a shard")
    with pytest.raises(Exception, match="did not finish"):
        open_cache(str(tmp_path / "killed"))
    uri = build_cache(cfg)
    assert shard_digests(uri) == shard_digests(ref)
    assert not list((tmp_path / "killed").rglob("*.tmp-*"))
    a, b = open_cache(uri).index(), open_cache(ref).index()
    assert a.equals(b) and not a.duplicated(["split", "sequence", "position"]).any()


@pytest.mark.slow
def test_ray_two_workers_build_the_same_cache(tmp_path):
    ray = pytest.importorskip("ray")
    cfg = corpus_config(tmp_path, out="ray")
    ref = build_cache(cfg.replace(output=str(tmp_path / "local")))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        uri = build_cache(cfg, num_workers=2)
    finally:
        ray.shutdown()
    a, b = open_cache(uri), open_cache(ref)
    assert [n for n, *_ in shard_digests(uri)] == [n for n, *_ in shard_digests(ref)]
    assert a.index().equals(b.index())
    for x, y in zip(a.sequence_batches("train", 8), b.sequence_batches("train", 8)):
        assert torch.equal(x.tokens, y.tokens)
        assert torch.allclose(x.acts[HOOK], y.acts[HOOK], atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_uri(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    import pyarrow.fs as pafs
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("bucket")
    yield f"s3://bucket/caches/tiny?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    server.stop()


def test_s3_round_trip(s3_uri, tmp_path):
    uri, cfg, windows = build_tiny(s3_uri, store_logits=True, logits_top_k=4)
    assert uri == s3_uri
    reader = open_cache(s3_uri)
    local_uri, _, _ = build_tiny(tmp_path / "local", store_logits=True, logits_top_k=4)
    assert shard_digests_remote(reader) == shard_digests(local_uri)
    got = torch.cat([b.acts[HOOK] for b in reader.sequence_batches("train", 7)])
    want = torch.cat([b.acts[HOOK] for b in open_cache(local_uri).sequence_batches("train", 7)])
    assert torch.equal(got, want)
    src = reader.token_source(HOOK)
    assert sum(b.input.shape[0] for b in src.iter_batches(32, seed=0, epoch=0)) == src.num_tokens
    reader.verify()
    assert len(reader.index()) == int(windows["train"].attention_mask.sum()
                                      + windows["val"].attention_mask.sum())
    with pytest.raises(CacheExistsError, match="s3://bucket/caches/tiny/build.json"):
        build_tiny(s3_uri, dtype="float16")


def shard_digests_remote(reader):
    return [(r["name"], r["sha256"], r["index_sha256"]) for s in reader.manifest["splits"].values()
            for r in s["shards"]]


def test_cli_cache_builds_and_reports_user_errors_in_one_line(tmp_path, capsys):
    cfg = corpus_config(tmp_path)
    cfg.to_yaml(tmp_path / "cache.yaml")
    assert cli_main(["cache", str(tmp_path / "cache.yaml")]) == 0
    assert (tmp_path / "cache" / "manifest.json").exists()
    cfg.replace(dtype="float16").to_yaml(tmp_path / "other.yaml")
    assert cli_main(["cache", str(tmp_path / "other.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "differs in: dtype" in err and "Traceback" not in err
    assert cli_main(["cache", str(tmp_path / "other.yaml"), "--overwrite"]) == 0
    assert open_cache(str(tmp_path / "cache")).manifest["act_dtype"] == "float16"


def test_empty_corpus_and_too_long_windows_are_user_errors(tmp_path):
    from activation_cache import UserError
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("   \n")
    cfg = corpus_config(tmp_path, corpus={"source": "files", "paths": [str(tmp_path / "blank")]})
    with pytest.raises(UserError, match="empty"):
        build_cache(cfg)
    with pytest.raises(UserError, match="longer than the model's context n_ctx=64"):
        build_cache(corpus_config(tmp_path, max_text_length=65))
    assert not (tmp_path / "cache" / "build.json").exists()


def test_s3_overwrite_replaces_only_a_cache(s3_uri):
    """On an object store too: --overwrite replaces a cache's own objects, and refuses a prefix
    holding any other object (which stays, byte for byte)."""
    from activation_cache.storage import Storage

    s3_uri = s3_uri.replace("caches/tiny?", "caches/tiny-overwrite?")  # moto's state is global
    build_tiny(s3_uri)
    storage = Storage(s3_uri)
    storage.write_atomic("NOTES.md", b"a user's object")
    before = {rel: storage.read_bytes(rel) for rel in storage.list("")}
    model, ident = tiny_model()
    other = tiny_config(s3_uri, dtype="float16")
    with pytest.raises(CacheExistsError, match=r"not part of a cache \(NOTES.md\)"):
        build_from_windows(other, model, ident, tiny_windows(), overwrite=True)
    assert {rel: storage.read_bytes(rel) for rel in storage.list("")} == before
    storage.delete("NOTES.md")
    build_from_windows(other, model, ident, tiny_windows(), overwrite=True)
    assert open_cache(s3_uri).manifest["act_dtype"] == "float16"
