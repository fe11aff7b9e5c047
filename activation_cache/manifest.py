"""manifest.json: the table of contents of a cache, written last, read and validated first.

Schema (version 2)::

    format, version          "sae-sweep/activation-cache", 2
    window_order             "sampled across documents": each split's windows are in rank order
                             (see window_sampling.py), so max_tokens and any prefix sample all
                             of its documents. Absent from format 1, whose windows are in
                             document order (max_tokens kept a split's first documents):
                             read_manifest fills in "document order" for it.
    created_utc              ISO time the build finished
    config, config_sha256    the CacheConfig as a dict, and sha256 of its canonical JSON
    model                    model_identity(): name, source sha256, dtype, d_model, n_layers, ...
    hooks                    the hooks the config asked for (what SAEs train on)
    stored_hooks             hooks + splice residuals, deduplicated (each stored as acts.{hook})
    splice_hooks             {hook: "blocks.{L}.hook_resid_pre"} when the splice residual is stored
    d_in                     {stored hook: width}
    seq_len, act_dtype       window length T; storage dtype of activations
    logits                   null, or {"k", "d_vocab", "full"} for the compact clean log-probs
    excluded                 {"padding": true, "bos": bool, "bos_token_id", "pad_token_id",
                              "token_ids": [...]} -- what train_mask leaves out
    tensors                  {tensor name: {"dtype", "shape"}} per window (shape without N)
    splits                   {"train"|"val"|"test": {"num_sequences", "num_tokens" (real tokens),
                              "num_train_tokens" (train_mask), "num_documents",
                              "shards": [shard record, ...]}}
    bytes_per_token          {item: bytes on disk per real token}; "total"
    probes                   optional (absent: no probe sets; older caches): {"pooling": "last
                             token", "max_text_tokens", "prepend_bos", "build_seconds",
                             "sets": {name: {"name", "source", "classes", "file", "bytes",
                             "sha256", "hooks", "num_texts", "num_tokens", "parts":
                             {"train"|"val"|"test": n}, "positives": {...}}}}

A shard record: ``name`` (e.g. "train-00003"), ``split``, ``file`` (shards/NAME.safetensors),
``bytes``, ``sha256``, ``first_sequence``, ``num_sequences``, ``num_tokens``,
``num_train_tokens``, ``tensors`` ({name: dtype, shape, offset, bytes, sha256}), and
``index_file`` / ``index_bytes`` / ``index_sha256`` for its per-token Parquet index.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from .cache_errors import CacheError, CorruptCacheError
from .storage import Storage

FORMAT = "sae-sweep/activation-cache"
VERSION = 2
"""The cache format this code writes. 2: each split's windows in rank order, sampled across its
documents. 1: in document order (still readable)."""
READABLE_VERSIONS = (1, 2)
WINDOW_ORDER = {1: "document order", 2: "sampled across documents"}
"""``window_order`` of each format, in words."""
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")

_TOP_KEYS = {
    "format": str, "version": int, "config": dict, "config_sha256": str, "model": dict,
    "hooks": list, "stored_hooks": list, "splice_hooks": dict, "d_in": dict, "seq_len": int,
    "act_dtype": str, "excluded": dict, "tensors": dict, "splits": dict,
}
_PROBE_KEYS = {"name": str, "source": str, "classes": list, "file": str, "bytes": int,
               "sha256": str, "hooks": list, "num_texts": int, "parts": dict}
_SHARD_KEYS = {
    "name": str, "split": str, "file": str, "bytes": int, "sha256": str, "first_sequence": int,
    "num_sequences": int, "num_tokens": int, "num_train_tokens": int, "tensors": dict,
    "index_file": str, "index_bytes": int, "index_sha256": str,
}


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of a config dict's canonical JSON (equal configs <=> equal digests)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def act_key(hook: str) -> str:
    """The shard tensor name of a hook's activations."""
    return f"acts.{hook}"


def read_manifest(storage: Storage) -> dict:
    """Load and validate ``manifest.json``; a :class:`CacheError` names the file and problem."""
    where = storage.describe(MANIFEST)
    if not storage.exists(MANIFEST):
        if storage.exists("build.json"):
            raise CacheError(f"{where}: missing: the build of this cache did not finish; "
                             "rerun `sae-sweep cache` with the same config to resume it")
        raise CacheError(f"{where}: missing: {storage.describe('')} is not an activation cache")
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCacheError(f"{where}: not valid JSON: {exc}") from None
    validate_manifest(manifest, where)
    manifest.setdefault("window_order", WINDOW_ORDER[manifest["version"]])
    return manifest


def describe_window_order(manifest: Mapping[str, Any]) -> str:
    """``windows sampled across documents (format 2)`` or ``windows in document order (format
    1)``: how a cache's windows were chosen and ordered."""
    version = manifest.get("version")
    order = manifest.get("window_order") or WINDOW_ORDER.get(version, "unknown order")
    return f"windows {'in ' if order == 'document order' else ''}{order} (format {version})"


def validate_manifest(m: Any, where: str) -> None:
    """Check the schema and the internal consistency of a manifest dict."""
    def bad(msg: str) -> CorruptCacheError:
        return CorruptCacheError(f"{where}: {msg}")

    if not isinstance(m, dict):
        raise bad("expected a JSON object")
    if m.get("format") != FORMAT:
        raise bad(f"format is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("version") not in READABLE_VERSIONS:
        raise bad(f"version {m.get('version')!r} is not supported (this reader knows "
                  f"{', '.join(map(str, READABLE_VERSIONS))}); a newer sae-sweep wrote it")
    for key, typ in _TOP_KEYS.items():
        if not isinstance(m.get(key), typ):
            raise bad(f"field {key!r} is missing or not a {typ.__name__}")
    if m["version"] >= 2 and m.get("window_order") != WINDOW_ORDER[m["version"]]:
        raise bad(f"field 'window_order' is {m.get('window_order')!r}, expected "
                  f"{WINDOW_ORDER[m['version']]!r} in format {m['version']}")
    for h in m["stored_hooks"]:
        if not isinstance(m["d_in"].get(h), int):
            raise bad(f"d_in has no width for stored hook {h!r}")
        spec = m["tensors"].get(act_key(h))
        if spec is None:
            raise bad(f"tensors has no entry for hook {h!r}")
        if spec["shape"] != [m["seq_len"], m["d_in"][h]]:
            raise bad(f"hook {h!r}: tensor shape {spec['shape']} does not match "
                      f"seq_len={m['seq_len']} and d_in={m['d_in'][h]}")
    for h in m["hooks"]:
        if h not in m["stored_hooks"]:
            raise bad(f"hook {h!r} is listed in hooks but not in stored_hooks")
    for split, info in m["splits"].items():
        if split not in SPLITS:
            raise bad(f"unknown split {split!r}")
        shards = info.get("shards")
        if not isinstance(shards, list):
            raise bad(f"splits.{split}.shards is missing")
        next_seq = 0
        for i, rec in enumerate(shards):
            for key, typ in _SHARD_KEYS.items():
                if not isinstance(rec.get(key), typ):
                    raise bad(f"splits.{split}.shards[{i}]: field {key!r} missing or not {typ.__name__}")
            if rec["first_sequence"] != next_seq:
                raise bad(f"shard {rec['name']}: starts at sequence {rec['first_sequence']}, "
                          f"expected {next_seq} (a shard is missing from the list)")
            next_seq += rec["num_sequences"]
            for name in m["tensors"]:
                if name not in rec["tensors"]:
                    raise bad(f"shard {rec['name']}: has no tensor {name!r}")
        for key in ("num_sequences", "num_tokens", "num_train_tokens"):
            total = sum(r[key] for r in shards)
            if info.get(key) != total:
                raise bad(f"splits.{split}.{key} is {info.get(key)!r} but its shards sum to {total}")
    if "probes" in m:
        probes = m["probes"]
        if not isinstance(probes, dict) or not isinstance(probes.get("sets"), dict):
            raise bad("field 'probes' is not an object with 'sets'")
        for name, rec in probes["sets"].items():
            for key, typ in _PROBE_KEYS.items():
                if not isinstance(rec.get(key) if isinstance(rec, dict) else None, typ):
                    raise bad(f"probes.sets.{name}: field {key!r} missing or not {typ.__name__}")
            if sum(rec["parts"].values()) != rec["num_texts"]:
                raise bad(f"probes.sets.{name}: its parts do not add up to num_texts")
            for h in rec["hooks"]:
                if h not in m["stored_hooks"]:
                    raise bad(f"probes.sets.{name}: hook {h!r} is not a stored hook")


def write_manifest(storage: Storage, manifest: dict) -> None:
    """Validate then atomically write ``manifest.json`` (the commit point of a build)."""
    validate_manifest(manifest, storage.describe(MANIFEST))
    storage.write_atomic(MANIFEST, json.dumps(manifest, indent=1).encode())
