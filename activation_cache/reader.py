"""Reading a cache: ``open_cache`` -> :class:`CacheReader` -> token batches or whole windows.

**Token batches** (``token_source(hook).iter_batches``, the trainer's ``ActivationSource``):
rows of the train-mask tokens only (no padding, no BOS unless the cache kept it), float32 by
default or as stored (``dtype=None``: fp16/bf16, half the bytes, for a conversion on the GPU),
as :class:`~activation_cache.TokenBatch` ``(input, target)``: for one hook the target is the
input tensor itself; with ``target_hook`` (a transcoder: e.g. the MLP input and the MLP output)
the two hooks' rows of the same tokens, cut from the same shuffled blocks (each read once from
its own memory-mapped shard tensor; no second copy of the data, no second shuffle).

The shuffle is a *block shuffle in a mixing buffer*. Each epoch the shards are put in a random
order and grouped into mixing buffers of at least N = ``shuffle_buffer_tokens`` train tokens
(default: 512 MiB of stored rows -- about 466k tokens at d_in 576 in fp16 -- so several shards;
a short remainder joins the last buffer). In a buffer the train tokens are cut into *blocks* of
at most b = ``block_tokens`` (default 32) consecutive tokens of one window, the blocks of all its
shards are permuted together, and batches are consecutive slices of the resulting stream (a
batch may straddle two buffers; only the last batch of an epoch may be smaller).

Mixing: a batch of B tokens is a uniformly random draw of about B/b blocks from a buffer of at
least N tokens, so one window of T train tokens (m = ceil(T/b) blocks) supplies on average
B*T/N of a batch's tokens -- as a per-token shuffle of the same buffer would -- in whole blocks,
and it supplies more than k of its blocks to a given batch with probability at most about
C(m, k+1) * (B/N)^(k+1) (a union bound; blocks of one window are adjacent in the stream no
more often than any two blocks). For the defaults (b 32, N ~466k, T 127, B 4096) some window
supplies more than 2 blocks (64 tokens, 1.6% of the batch) to at most about 1 batch in 100,
and no window ever supplies more than its T tokens (3.1%). The blocks are what make the reader fast: a batch is ~B/b contiguous
row ranges, copied once each, instead of B single-row gathers.

Everything is a pure function of ``(seed, epoch)`` and the manifest, so ``start_batch=n``
locates the buffer holding batch n without reading anything before it and yields exactly what
the uninterrupted iteration yields from batch n on. Local shards are memory-mapped (no copy)
and each batch is one copy out of the page cache; a background thread assembles the next few
batches while the trainer consumes the current one, single-threaded so it never competes for
torch's intra-op threads. With ``pin_memory=True`` (where CUDA is available) the batches are
allocated in pinned memory, ready for a non-blocking copy to the GPU.

**Windows** (``sequence_batches``, for end-to-end losses): whole windows with every stored tensor,
in cache order; with ``shuffle=True`` the shard order and the window order inside each shard are
permuted by ``seed`` (a block shuffle: each shard is read once per pass). The last batch may be
smaller.

**Verification.** ``open_cache`` checks the manifest's schema and that every shard and index file
exists with its recorded size (one directory listing): truncated or missing files fail at open.
Content checksums are verified *lazily*: the first time this reader reads a tensor of a shard it
hashes exactly the bytes it read (sha256, ~1-2 GB/s per core, run in the read-ahead thread) and
compares with the manifest; later reads of the same tensor are not re-hashed. So the first epoch
pays one hash of the bytes it reads and nothing more, and a cache is never fully re-read just to
open it. ``CacheReader.verify()`` checks every file's whole-file checksum up front;
``open_cache(..., verify=False)`` skips content hashing altogether.
"""

from __future__ import annotations

import hashlib
import io
import sys
import threading
from dataclasses import dataclass, fields
from typing import Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch import Tensor

from .cache_errors import CacheInputError, CacheMismatchError, CorruptCacheError
from .manifest import MANIFEST, SPLITS, act_key, canonical_json, read_manifest
from .probes import ProbeSet
from .synthetic import GroundTruth
from .read_ahead import read_ahead
from .shard_file import _ST_DTYPES, map_array, read_header, read_tensor
from .storage import Storage
from .strict_config import is_int
from .token_batch import TokenBatch

DEFAULT_BUFFER_BYTES = 512 * 2**20  # default mixing buffer, in stored bytes of rows
DEFAULT_BLOCK_TOKENS = 32  # default block: at most this many consecutive tokens of one window
_BATCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LOGIT_TENSORS = ("clean_topk_logprobs", "clean_topk_indices", "clean_logsumexp",
                 "clean_next_token_logprob")


@dataclass
class SequenceBatch:
    """Whole windows and everything stored for them (see ARCHITECTURE.md).

    ``clean_next_token_logprob[b, t]`` is log p_clean(tokens[b, t+1]); NaN at the last position
    and wherever token t or t+1 is padding. The logits fields are None when not stored.
    """

    tokens: Tensor  # [B, T] int64
    attention_mask: Tensor  # [B, T] bool: real tokens (BOS included)
    train_mask: Tensor  # [B, T] bool: tokens SAEs train/evaluate on
    acts: dict[str, Tensor]  # hook -> [B, T, d] float32 (SAE hooks and splice residuals)
    clean_topk_logprobs: Tensor | None = None  # [B, T, k] float32
    clean_topk_indices: Tensor | None = None  # [B, T, k] int64
    clean_logsumexp: Tensor | None = None  # [B, T] float32
    clean_next_token_logprob: Tensor | None = None  # [B, T] float32
    sequence: Tensor | None = None  # [B] int64: window number within its split
    doc_id: Tensor | None = None  # [B] int64: document of each window

    def to(self, device: torch.device | str) -> "SequenceBatch":
        """A copy with every tensor on ``device``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device)
            elif isinstance(v, dict):
                v = {k: t.to(device) for k, t in v.items()}
            out[f.name] = v
        return SequenceBatch(**out)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def open_cache(path_or_uri: str, *, verify: bool = True) -> "CacheReader":
    """Open a finished cache (local folder or pyarrow URI); see the module doc for checks."""
    return CacheReader(Storage(path_or_uri), verify=verify)


class CacheReader:
    """A finished cache: its manifest, its token sources and its window batches."""

    def __init__(self, storage: Storage, *, verify: bool = True):
        self.storage = storage
        self.uri = storage.uri
        self.manifest: dict = read_manifest(storage)
        self.verify_checksums = verify
        self._verified: set[tuple[str, str]] = set()
        self._headers_checked: set[str] = set()
        self._lock = threading.Lock()
        self._check_files()

    # -- what is in the cache --------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        """The SAE hooks the cache was built for."""
        return list(self.manifest["hooks"])

    @property
    def stored_hooks(self) -> list[str]:
        """Every stored hook (SAE hooks and splice residuals)."""
        return list(self.manifest["stored_hooks"])

    def d_in(self, hook: str) -> int:
        """The width of a stored hook's activations."""
        self._require_hook(hook)
        return int(self.manifest["d_in"][hook])

    def num_tokens(self, split: str = "train", *, train_mask: bool = True) -> int:
        """Train-mask tokens of a split (or all real tokens with train_mask=False)."""
        info = self._split(split)
        return int(info["num_train_tokens"] if train_mask else info["num_tokens"])

    def num_sequences(self, split: str = "train") -> int:
        return int(self._split(split)["num_sequences"])

    def check_model(self, identity: Mapping) -> None:
        """Raise :class:`CacheMismatchError` unless ``identity`` (model_identity()) is the cache's."""
        mine = self.manifest["model"]
        diff = [k for k in sorted(set(mine) | set(identity))
                if canonical_json(mine.get(k)) != canonical_json(identity.get(k))]
        if diff:
            raise CacheMismatchError(
                f"{self.storage.describe(MANIFEST)}: the cache was built with another model "
                f"(differs in {', '.join(diff)}: cache has "
                f"{ {k: mine.get(k) for k in diff[:3]} }, given { {k: identity.get(k) for k in diff[:3]} })"
            )

    @property
    def has_ground_truth(self) -> bool:
        """Whether the cache is synthetic and holds the truth behind its activations."""
        return bool(self.manifest.get("synthetic"))

    def ground_truth(self) -> GroundTruth | None:
        """The truth behind a synthetic cache (activation_cache/synthetic.py): feature
        directions [n_features, d], frequencies, parents, hook and spec; None for a model's
        cache. The file's sha256 is checked (unless opened with verify=False)."""
        info = self.manifest.get("synthetic")
        if not info:
            return None
        entry = info["ground_truth"]
        data = self.storage.read_bytes(entry["file"])
        self._check_digest(data, entry["sha256"], entry["file"], "ground truth")
        from safetensors.torch import load

        t = load(data)
        return GroundTruth(directions=t["directions"], frequencies=t["frequencies"],
                           parents=t["parents"], hook=info["hook"], spec=dict(info["spec"]))

    # -- probe sets ------------------------------------------------------------------------
    def probe_sets(self) -> list[str]:
        """The names of the cache's probe sets (activation_cache/probes.py), in the config's
        order; [] for a cache built without ``probes:`` (or before probe sets existed)."""
        return list((self.manifest.get("probes") or {}).get("sets", {}))

    def probe_set(self, name: str) -> ProbeSet:
        """One probe set: the last-token activation of each of its texts for every SAE hook,
        its 0/1 labels and its train/val/test parts (sha256 checked unless verify=False).
        CacheMismatchError (with the closest names) for a set the cache does not hold."""
        sets = (self.manifest.get("probes") or {}).get("sets", {})
        if name not in sets:
            import difflib

            close = difflib.get_close_matches(name, list(sets), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            held = f"it holds {', '.join(sets)}" if sets else "it was built without `probes:`"
            raise CacheMismatchError(f"{self.storage.describe(MANIFEST)}: no probe set "
                                     f"{name!r}{hint}; {held}")
        rec = sets[name]
        data = self.storage.read_bytes(rec["file"])
        if len(data) != rec["bytes"]:
            raise CorruptCacheError(f"{self.storage.describe(rec['file'])}: {len(data)} bytes, "
                                    f"but the manifest records {rec['bytes']}; rebuild the cache")
        self._check_digest(data, rec["sha256"], rec["file"], "probe set")
        from safetensors.torch import load

        t = load(data)
        return ProbeSet(name=name, source=rec["source"], classes=tuple(rec["classes"]),
                        acts={h: t[act_key(h)].float() for h in rec["hooks"]},
                        labels=t["label"].long(), parts=t["part"])

    def index(self, split: str | None = None) -> pd.DataFrame:
        """The per-token index (split, shard, row, sequence, position, token_id, train_mask,
        doc_id) as a pandas DataFrame, one row per real token."""
        frames = []
        for s in ([split] if split else list(self.manifest["splits"])):
            for rec in self._split(s)["shards"]:
                data = self.storage.read_bytes(rec["index_file"])
                self._check_digest(data, rec["index_sha256"], rec["index_file"], "index")
                frames.append(pq.read_table(io.BytesIO(data)).to_pandas())
        if not frames:
            return pd.DataFrame()
        return pd.concat(frames, ignore_index=True)

    def verify(self) -> None:
        """Check every shard's and index's whole-file sha256 now (reads the whole cache)."""
        for split in self.manifest["splits"]:
            for rec in self._split(split)["shards"]:
                for file, digest in ((rec["file"], rec["sha256"]),
                                     (rec["index_file"], rec["index_sha256"])):
                    self._check_digest(self.storage.read_bytes(file), digest, file, "file")
                with self._lock:
                    self._verified.update((rec["file"], n) for n in rec["tensors"])

    # -- token batches ---------------------------------------------------------------------
    def token_source(self, hook: str, split: str = "train", *, d_in: int | None = None,
                     shuffle_buffer_tokens: int | None = None,
                     block_tokens: int = DEFAULT_BLOCK_TOKENS,
                     dtype: torch.dtype | None = torch.float32, pin_memory: bool = False,
                     read_ahead_batches: int = 4, target_hook: str | None = None
                     ) -> "CacheTokenSource":
        """An ActivationSource of the train-mask tokens of ``hook`` in ``split``: batches of
        ``TokenBatch(input, target)``.

        ``target_hook``: the hook whose rows of the same tokens are the target (None or
        ``hook``: the target is the input tensor itself).
        ``d_in``: the width the caller expects (raises CacheMismatchError if different).
        ``shuffle_buffer_tokens``: the mixing buffer N, the least number of tokens whose blocks
        are permuted together (default: 512 MiB of stored rows, at least one shard).
        ``block_tokens``: b, the most consecutive tokens of one window kept together.
        ``dtype``: dtype of the batches (float32 by default; ``None``: the storage dtype, e.g.
        float16, for a conversion on the GPU). ``pin_memory``: allocate batches in pinned memory
        (only where CUDA is available; ignored otherwise).
        """
        width = self.d_in(hook)
        if target_hook == hook:
            target_hook = None
        if target_hook is not None:
            self.d_in(target_hook)  # CacheMismatchError when it is not stored
        if d_in is not None and d_in != width:
            raise CacheMismatchError(
                f"{self.storage.describe(MANIFEST)}: hook {hook!r} has d_in={width} in this "
                f"cache, but {d_in} was expected (an SAE for another model or hook?)"
            )
        info = self._split(split)
        if info["num_train_tokens"] == 0:
            raise CacheMismatchError(f"{self.storage.describe(MANIFEST)}: split {split!r} has "
                                     "no train-mask tokens")
        if shuffle_buffer_tokens is not None and (not is_int(shuffle_buffer_tokens)
                                                  or shuffle_buffer_tokens < 1):
            raise CacheInputError(f"shuffle_buffer_tokens: must be an integer >= 1 (None: the "
                                  f"default), got {shuffle_buffer_tokens!r}")
        if not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be an integer >= 1, got {block_tokens!r}")
        if dtype is not None and dtype not in _BATCH_DTYPES:
            raise ValueError(f"dtype must be None (as stored) or one of "
                             f"{', '.join(map(str, _BATCH_DTYPES))}, got {dtype!r}")
        row_bytes = 0
        for h in (hook,) if target_hook is None else (hook, target_hook):
            stored = _ST_DTYPES[info["shards"][0]["tensors"][act_key(h)]["dtype"]]
            row_bytes += self.d_in(h) * stored.itemsize
        buffer = shuffle_buffer_tokens or max(1, DEFAULT_BUFFER_BYTES // row_bytes)
        return CacheTokenSource(self, hook, split, buffer, read_ahead_batches,
                                block_tokens=block_tokens, dtype=dtype, pin_memory=pin_memory,
                                target_hook=target_hook)

    # -- window batches --------------------------------------------------------------------
    def sequence_batches(self, split: str, batch_size: int, *, start_batch: int = 0,
                         seed: int = 0, shuffle: bool = False,
                         read_ahead_batches: int = 2) -> Iterator[SequenceBatch]:
        """Batches of whole windows with every stored tensor (see the module doc)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shards = self._split(split)["shards"]
        order = []  # (shard number, row) in iteration order
        shard_order = np.arange(len(shards))
        rng = np.random.default_rng([seed, 7]) if shuffle else None
        if rng is not None:
            shard_order = rng.permutation(len(shards))
        for s in shard_order:
            rows = np.arange(shards[s]["num_sequences"])
            if rng is not None:
                rows = rng.permutation(rows)
            order.extend((int(s), int(r)) for r in rows)
        start = start_batch * batch_size

        def produce() -> Iterator[SequenceBatch]:
            loaded: dict[int, dict[str, Tensor]] = {}
            for a in range(start, len(order), batch_size):
                picks = order[a:a + batch_size]
                needed = {s for s, _ in picks}
                for s in list(loaded):
                    if s not in needed:
                        del loaded[s]
                for s in needed:
                    if s not in loaded:
                        loaded[s] = self._read_shard(shards[s])
                yield self._assemble(picks, loaded)

        return read_ahead(produce, read_ahead_batches)

    def _assemble(self, picks: list[tuple[int, int]], loaded: dict[int, dict[str, Tensor]]
                  ) -> SequenceBatch:
        def take(name: str) -> Tensor:
            parts, i = [], 0
            while i < len(picks):  # runs of consecutive rows of one shard -> one slice
                s, r = picks[i]
                j = i + 1
                while j < len(picks) and picks[j][0] == s and picks[j][1] == picks[j - 1][1] + 1:
                    j += 1
                parts.append(loaded[s][name][r:r + (j - i)])
                i = j
            return parts[0].clone() if len(parts) == 1 else torch.cat(parts)

        has_logits = self.manifest.get("logits") is not None
        return SequenceBatch(
            tokens=take("tokens").long(), attention_mask=take("attention_mask"),
            train_mask=take("train_mask"),
            acts={h: take(act_key(h)).float() for h in self.manifest["stored_hooks"]},
            clean_topk_logprobs=take("clean_topk_logprobs").float() if has_logits else None,
            clean_topk_indices=take("clean_topk_indices").long() if has_logits else None,
            clean_logsumexp=take("clean_logsumexp").float() if has_logits else None,
            clean_next_token_logprob=(take("clean_next_token_logprob").float()
                                      if has_logits else None),
            sequence=take("sequence"), doc_id=take("doc_id"),
        )

    # -- shard access ----------------------------------------------------------------------
    def read_tensors(self, rec: Mapping, names: list[str]) -> dict[str, Tensor]:
        """Some tensors of one shard record, read into memory and verified on their first read
        by this reader."""
        return self._read(rec, names, mmap=False)

    def map_arrays(self, rec: Mapping, names: list[str]) -> dict[str, np.ndarray]:
        """Some tensors of one shard record as numpy arrays (bfloat16 bytes as int16), verified
        on their first read by this reader: read-only memory maps of the file's pages when the
        cache is on a local disk (no copy), read into memory otherwise."""
        out = self._read(rec, names, mmap=True)
        for name, a in out.items():
            if isinstance(a, Tensor):
                out[name] = (a.view(torch.int16) if a.dtype == torch.bfloat16 else a).numpy()
        return out

    def _read(self, rec: Mapping, names: list[str], *, mmap: bool) -> dict:
        out = {}
        with self.storage.open_ranges(rec["file"]) as f:
            if rec["file"] not in self._headers_checked:
                self._check_header(f, rec)
            for name in names:
                entry = rec["tensors"].get(name)
                if entry is None:
                    raise CacheMismatchError(f"{f.name}: has no tensor {name!r}")
                key = (rec["file"], name)
                verify = self.verify_checksums and key not in self._verified
                if mmap and self.storage.is_local:
                    out[name] = map_array(self.storage.full(rec["file"]), entry, verify=verify,
                                          name=name)
                else:
                    out[name] = read_tensor(f, entry, verify=verify, name=name)
                if verify:
                    with self._lock:
                        self._verified.add(key)
        return out

    def _read_shard(self, rec: Mapping) -> dict[str, Tensor]:
        return self.read_tensors(rec, list(rec["tensors"]))

    def _check_header(self, f, rec: Mapping) -> None:
        header = read_header(f)
        for name, entry in rec["tensors"].items():
            h = header.get(name)
            if h is None or h["dtype"] != entry["dtype"] or list(h["shape"]) != entry["shape"]:
                got = "missing" if h is None else f"{h['dtype']} {h['shape']}"
                raise CorruptCacheError(
                    f"{f.name}: tensor {name!r} is {got} in the file but {entry['dtype']} "
                    f"{entry['shape']} in the manifest (the shard does not belong to this cache)"
                )
        with self._lock:
            self._headers_checked.add(rec["file"])

    def _check_files(self) -> None:
        sizes = self.storage.sizes("shards")
        sizes.update(self.storage.sizes("index"))
        if self.manifest.get("probes"):
            sizes.update(self.storage.sizes("probes"))
            for rec in self.manifest["probes"]["sets"].values():
                if sizes.get(rec["file"]) != rec["bytes"]:
                    raise CorruptCacheError(
                        f"{self.storage.describe(rec['file'])}: probe set file is missing or "
                        f"not of the {rec['bytes']} bytes the manifest records; rebuild the cache")
        for split in self.manifest["splits"]:
            for rec in self._split(split)["shards"]:
                for file, size in ((rec["file"], rec["bytes"]), (rec["index_file"], rec["index_bytes"])):
                    got = sizes.get(file)
                    if got is None:
                        raise CorruptCacheError(f"{self.storage.describe(file)}: shard file is "
                                                "missing (listed in manifest.json)")
                    if got != size:
                        raise CorruptCacheError(
                            f"{self.storage.describe(file)}: {got} bytes, but the manifest "
                            f"records {size} (truncated or replaced); rebuild the cache"
                        )

    def _check_digest(self, data: bytes, digest: str, file: str, what: str) -> None:
        if self.verify_checksums and hashlib.sha256(data).hexdigest() != digest:
            raise CorruptCacheError(f"{self.storage.describe(file)}: {what} fails its sha256 "
                                    "check (corrupted or changed after the build); rebuild the cache")

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise CacheMismatchError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        info = self.manifest["splits"].get(split)
        if info is None:
            why = ""
            if split == "test" and "test_fraction" not in self.manifest.get("config", {}):
                why = (" (it was built before caches had a test split; rebuild it with "
                       "test_fraction > 0 for held-out test figures)")
            raise CacheMismatchError(
                f"{self.storage.describe(MANIFEST)}: has no {split!r} split{why}")
        return info

    def _require_hook(self, hook: str) -> None:
        if hook not in self.manifest["d_in"]:
            raise CacheMismatchError(
                f"{self.storage.describe(MANIFEST)}: hook {hook!r} is not in this cache "
                f"(it stores: {', '.join(self.manifest['stored_hooks'])})"
            )


class CacheTokenSource:
    """The ActivationSource of one hook (and a target hook) and split of a cache (see the
    module doc).

    ``dtype`` is the dtype of the batches it yields (``float32`` by default; the storage dtype
    when created with ``dtype=None``); ``pin_memory`` whether their memory is pinned (page-locked,
    only where CUDA is available) so a non-blocking copy to a GPU can overlap with compute.
    """

    def __init__(self, reader: CacheReader, hook: str, split: str, buffer_tokens: int,
                 read_ahead_batches: int, *, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 dtype: torch.dtype | None = torch.float32, pin_memory: bool = False,
                 target_hook: str | None = None):
        self.reader = reader
        self.hook = hook
        self.target_hook = target_hook
        """The target's hook (None: the target is the input)."""
        self.split = split
        self.d_in = reader.d_in(hook)
        self.d_out = self.d_in if target_hook is None else reader.d_in(target_hook)
        self.shards = [r for r in reader._split(split)["shards"] if r["num_train_tokens"] > 0]
        self.num_tokens = sum(r["num_train_tokens"] for r in self.shards)
        self.buffer_tokens = buffer_tokens
        self.block_tokens = block_tokens
        self.read_ahead_batches = read_ahead_batches
        self.hooks = (hook,) if target_hook is None else (hook, target_hook)
        self.widths = tuple(reader.d_in(h) for h in self.hooks)
        self.stored_dtypes = tuple(
            _ST_DTYPES[self.shards[0]["tensors"][act_key(h)]["dtype"]] if self.shards
            else torch.float32 for h in self.hooks)
        self.stored_dtype = self.stored_dtypes[0]
        self.dtype = self.stored_dtype if dtype is None else dtype
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def chunks(self, seed: int, epoch: int) -> list[list[int]]:
        """The shard groups (mixing buffers) of an epoch, in order (a function of seed and epoch
        only): the shards in a random order, cut into groups of at least ``buffer_tokens``
        train tokens; a last group shorter than that joins the one before it."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.shards))
        groups, current, size = [], [], 0
        for s in order:
            current.append(int(s))
            size += self.shards[s]["num_train_tokens"]
            if size >= self.buffer_tokens:
                groups.append(current)
                current, size = [], 0
        if current:
            if groups:
                groups[-1].extend(current)
            else:
                groups.append(current)
        return groups

    def load_chunk(self, group: list[int], seed: int, epoch: int, number: int) -> "_Chunk":
        """The shards of a group (memory-mapped when local), cut into blocks of at most
        ``block_tokens`` consecutive train tokens of one window, the blocks permuted."""
        keys = [act_key(h) for h in self.hooks]
        sources: list[list[np.ndarray]] = [[] for _ in keys]  # per hook, per shard
        shard_of, start_of, length_of = [], [], []
        for i, s in enumerate(group):
            if s not in self._blocks:  # the same every epoch: cut once
                mask = self.reader.map_arrays(self.shards[s], ["train_mask"])["train_mask"]
                self._blocks[s] = _blocks(mask.reshape(-1), mask.shape[-1], self.block_tokens)
            starts, lengths = self._blocks[s]
            arrays = self.reader.map_arrays(self.shards[s], keys)
            for h, (key, width) in enumerate(zip(keys, self.widths)):
                sources[h].append(arrays[key].reshape(-1, width))
            shard_of.append(np.full(len(starts), i))
            start_of.append(starts)
            length_of.append(lengths)
        shard = np.concatenate(shard_of)
        perm = np.random.default_rng([seed, epoch, number]).permutation(len(shard))
        return _Chunk(sources, shard[perm], np.concatenate(start_of)[perm],
                      np.concatenate(length_of)[perm])

    def iter_batches(self, batch_size: int, *, seed: int, epoch: int,
                     start_batch: int = 0) -> Iterator[TokenBatch]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        groups = self.chunks(seed, epoch)
        ends = np.cumsum([sum(self.shards[s]["num_train_tokens"] for s in g) for g in groups])
        total = self.num_tokens
        pos = start_batch * batch_size
        if pos >= total:
            return iter(())
        first = int(np.searchsorted(ends, pos, side="right"))

        def produce() -> Iterator[TokenBatch]:
            buffers = [_BatchBuffers(batch_size, width, self.dtype, self.pin_memory,
                                     keep=self.read_ahead_batches + 4) for width in self.widths]
            cur = pos
            parts: list[list[np.ndarray]] = [[] for _ in self.hooks]
            for number in range(first, len(groups)):
                chunk = self.load_chunk(groups[number], seed, epoch, number)
                begin = int(ends[number - 1]) if number else 0
                while cur < ends[number]:
                    batch_end = min((cur // batch_size + 1) * batch_size, total)
                    stop = min(batch_end, int(ends[number]))
                    for h, views in enumerate(chunk.slices(cur - begin, stop - begin)):
                        parts[h].extend(views)
                    cur = stop
                    if cur == batch_end:
                        x = self._assemble(parts[0], buffers[0], self.stored_dtypes[0])
                        if len(parts) == 1:
                            yield TokenBatch(x, x)
                        else:
                            yield TokenBatch(x, self._assemble(parts[1], buffers[1],
                                                               self.stored_dtypes[1]))
                        parts = [[] for _ in self.hooks]

        return read_ahead(produce, self.read_ahead_batches)

    def _assemble(self, parts: list[np.ndarray], buffers: "_BatchBuffers",
                  stored_dtype: torch.dtype) -> Tensor:
        """One batch from its row slices: one copy into the output, or -- when the output dtype
        is not the storage dtype -- one copy into a scratch buffer (which stays in the CPU's
        cache) and a converting copy into the output."""
        n = sum(len(p) for p in parts)
        out = buffers.get(n)
        if self.dtype == stored_dtype:
            np.concatenate(parts, axis=0, out=_numpy(out))
            return out
        scratch = buffers.scratch(stored_dtype)[:n]
        np.concatenate(parts, axis=0, out=_numpy(scratch))
        # Pieces below torch's parallel grain size: the reader thread never wakes torch's
        # intra-op pool (it belongs to the trainer).
        step = max(1, _SERIAL_ELEMENTS // out.shape[1])
        torch.cat([scratch[i:i + step] for i in range(0, n, step)], out=out)
        return out


def _numpy(t: Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array (bfloat16 as int16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


class _BatchBuffers:
    """Memory for the batches of one iteration, recycled once the consumer lets go of a batch.

    A fresh allocation per batch costs a page fault and the zeroing of every page (as much as
    the copy itself). Batches are therefore numpy arrays handed out through ``torch.from_numpy``
    (which keeps its array referenced for as long as any tensor or view of it lives): an array
    referenced only by this pool is free to be filled again. At most ``keep`` arrays are kept;
    beyond that, batches are plain allocations. Pinned batches come from torch's pinned-memory
    allocator instead, which recycles its blocks itself (after their copies to the GPU end).
    """

    def __init__(self, rows: int, d_in: int, dtype: torch.dtype, pin_memory: bool, keep: int):
        self.shape = (rows, d_in)
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.keep = keep
        self.arrays: list[np.ndarray] = []
        self._scratch: Tensor | None = None
        self.np_dtype = (np.int16 if dtype == torch.bfloat16
                         else torch.empty(0, dtype=dtype).numpy().dtype)
        for probe in [np.empty(0)]:  # references of a free array, seen as get() sees them
            self.free_refs = sys.getrefcount(probe)

    def get(self, rows: int) -> Tensor:
        if self.pin_memory:
            return torch.empty((rows, self.shape[1]), dtype=self.dtype, pin_memory=True)
        for arr in self.arrays:
            if sys.getrefcount(arr) == self.free_refs:
                break
        else:
            arr = np.empty(self.shape, dtype=self.np_dtype)
            if len(self.arrays) < self.keep:
                self.arrays.append(arr)
        t = torch.from_numpy(arr[:rows])
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def scratch(self, dtype: torch.dtype) -> Tensor:
        """A reused [rows, d_in] buffer of ``dtype`` that is never handed out."""
        if self._scratch is None:
            self._scratch = torch.empty(self.shape, dtype=dtype)
        return self._scratch


def _blocks(train_mask: np.ndarray, seq_len: int, block_tokens: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of a shard's train tokens: ``(first storage row, length)`` of each run of at most
    ``block_tokens`` train tokens that are consecutive rows of one window."""
    rows = np.flatnonzero(train_mask)
    if len(rows) == 0:
        return rows, rows
    idx = np.arange(len(rows))
    new_run = np.ones(len(rows), dtype=bool)
    new_run[1:] = (np.diff(rows) != 1) | (rows[1:] % seq_len == 0)
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0))
    first = np.flatnonzero(new_run | ((idx - run_start) % block_tokens == 0))
    return rows[first], np.diff(np.append(first, len(rows)))


class _Chunk:
    """The shards of one mixing buffer and its permuted blocks: block i is rows
    ``start[i] : start[i] + length[i]`` of shard ``shard[i]``; the chunk's token stream is the
    blocks in this order. ``slices(a, b)`` gives stream positions [a, b) as views of the
    (memory-mapped) shards, one per block touched, for each hook (the same rows of every
    hook): assembling a batch is one copy of each."""

    def __init__(self, sources: list[list[np.ndarray]], shard: np.ndarray, start: np.ndarray,
                 length: np.ndarray):
        self.sources = sources  # per hook, per shard; numpy has no bfloat16: int16 bytes
        self.shard = shard
        self.start = start
        self.length = length
        self.ends = np.cumsum(length)

    def slices(self, a: int, b: int) -> list[list[np.ndarray]]:
        first = int(np.searchsorted(self.ends, a, side="right"))
        last = int(np.searchsorted(self.ends, b, side="left"))
        ends = self.ends[first:last + 1]
        begins = ends - self.length[first:last + 1]
        lo = self.start[first:last + 1] + (np.maximum(begins, a) - begins)
        hi = self.start[first:last + 1] + (np.minimum(ends, b) - begins)
        picks = list(zip(self.shard[first:last + 1].tolist(), lo.tolist(), hi.tolist()))
        return [[arrays[s][x:y] for s, x, y in picks] for arrays in self.sources]


# torch parallelises element-wise copies above 32768 elements; smaller copies stay serial.
_SERIAL_ELEMENTS = 32768
