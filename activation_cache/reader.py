"""Reading a cache: ``open_cache`` -> :class:`CacheReader` -> token batches or whole windows.

**Token batches** (``token_source(hook).iter_batches``, the trainer's ``ActivationSource``):
float32 rows of the train-mask tokens only (no padding, no BOS unless the cache kept it). The
shuffle is a *shard-mixing buffer*: each epoch the shards are put in a random order and grouped
into chunks of about ``shuffle_buffer_tokens`` tokens; the tokens of a chunk (drawn from several
shards) are permuted together, and batches are consecutive slices of the resulting stream (a batch
may straddle two chunks; only the last batch of an epoch may be smaller). Everything is a pure
function of ``(seed, epoch)`` and the manifest's token counts, so ``start_batch=n`` locates the
chunk holding batch n without reading anything before it and yields exactly what the
uninterrupted iteration yields from batch n on. Local shards are memory-mapped (no copy); a
background thread gathers and converts the next few batches while the trainer consumes the
current one, single-threaded so it never competes for torch's intra-op threads.

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
from .read_ahead import read_ahead
from .shard_file import map_tensor, read_header, read_tensor
from .storage import Storage
from .strict_config import is_int

DEFAULT_BUFFER_BYTES = 256 * 2**20
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
                     read_ahead_batches: int = 4) -> "CacheTokenSource":
        """An ActivationSource of the train-mask tokens of ``hook`` in ``split``.

        ``d_in``: the width the caller expects (raises CacheMismatchError if different).
        ``shuffle_buffer_tokens``: tokens permuted together (default: 256 MiB of float32 rows,
        at least one shard).
        """
        width = self.d_in(hook)
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
        buffer = shuffle_buffer_tokens or max(1, DEFAULT_BUFFER_BYTES // (4 * width))
        return CacheTokenSource(self, hook, split, buffer, read_ahead_batches)

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
    def read_tensors(self, rec: Mapping, names: list[str], *,
                     mmap: bool = False) -> dict[str, Tensor]:
        """Some tensors of one shard record, verified on their first read by this reader.

        ``mmap=True`` memory-maps them when the cache is on a local disk (no copy; the tensors
        are read-only views of the file's pages) and reads them into memory otherwise.
        """
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
                    out[name] = map_tensor(self.storage.full(rec["file"]), entry, verify=verify,
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
            raise CacheMismatchError(f"unknown split {split!r}: use 'train' or 'val'")
        info = self.manifest["splits"].get(split)
        if info is None:
            raise CacheMismatchError(f"{self.storage.describe(MANIFEST)}: has no {split!r} split")
        return info

    def _require_hook(self, hook: str) -> None:
        if hook not in self.manifest["d_in"]:
            raise CacheMismatchError(
                f"{self.storage.describe(MANIFEST)}: hook {hook!r} is not in this cache "
                f"(it stores: {', '.join(self.manifest['stored_hooks'])})"
            )


class CacheTokenSource:
    """The ActivationSource of one hook and split of a cache (see the module doc)."""

    def __init__(self, reader: CacheReader, hook: str, split: str, buffer_tokens: int,
                 read_ahead_batches: int):
        self.reader = reader
        self.hook = hook
        self.split = split
        self.d_in = reader.d_in(hook)
        self.shards = [r for r in reader._split(split)["shards"] if r["num_train_tokens"] > 0]
        self.num_tokens = sum(r["num_train_tokens"] for r in self.shards)
        self.buffer_tokens = buffer_tokens
        self.read_ahead_batches = read_ahead_batches

    def chunks(self, seed: int, epoch: int) -> list[list[int]]:
        """The shard groups of an epoch, in order (a function of seed and epoch only)."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.shards))
        groups, current, size = [], [], 0
        for s in order:
            n = self.shards[s]["num_train_tokens"]
            if current and size + n > self.buffer_tokens:
                groups.append(current)
                current, size = [], 0
            current.append(int(s))
            size += n
        if current:
            groups.append(current)
        return groups

    def load_chunk(self, group: list[int], seed: int, epoch: int, number: int) -> "_Chunk":
        """The shards of a group (memory-mapped when local) and the permutation of their rows."""
        key = act_key(self.hook)
        sources, row_of = [], []
        for s in group:
            t = self.reader.read_tensors(self.shards[s], ["train_mask", key], mmap=True)
            sources.append(t[key].reshape(-1, self.d_in))
            row_of.append(np.flatnonzero(t["train_mask"].numpy().reshape(-1)))
        shard_of = np.repeat(np.arange(len(group)), [len(r) for r in row_of])
        perm = np.random.default_rng([seed, epoch, number]).permutation(len(shard_of))
        return _Chunk(sources, shard_of[perm], np.concatenate(row_of)[perm], self.d_in)

    def iter_batches(self, batch_size: int, *, seed: int, epoch: int,
                     start_batch: int = 0) -> Iterator[Tensor]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        groups = self.chunks(seed, epoch)
        ends = np.cumsum([sum(self.shards[s]["num_train_tokens"] for s in g) for g in groups])
        total = self.num_tokens
        pos = start_batch * batch_size
        if pos >= total:
            return iter(())
        first = int(np.searchsorted(ends, pos, side="right"))

        def produce() -> Iterator[Tensor]:
            cur, carry = pos, []
            for number in range(first, len(groups)):
                chunk = self.load_chunk(groups[number], seed, epoch, number)
                begin = int(ends[number - 1]) if number else 0
                while cur < ends[number]:
                    batch_end = min((cur // batch_size + 1) * batch_size, total)
                    stop = min(batch_end, int(ends[number]))
                    carry.append(chunk.rows(cur - begin, stop - begin))
                    cur = stop
                    if cur == batch_end:
                        yield carry[0] if len(carry) == 1 else torch.cat(carry)
                        carry = []

        return read_ahead(produce, self.read_ahead_batches)


class _Chunk:
    """Shards of one shuffle chunk and, for each position of its permuted stream, the shard and
    row it comes from. ``rows(a, b)`` gathers positions [a, b) as float32.

    Which tokens form a batch is set by the permutation; inside a batch the rows are put in
    storage order (shard, then row), so each shard is gathered with one forward-sweeping
    ``np.take`` straight into the output (a batch is a set: its order does not matter). The gather and the conversion to
    float32 run single-threaded (numpy, and torch copies kept below its parallel grain size):
    the reader thread never wakes torch's intra-op pool, which belongs to the trainer.
    """

    def __init__(self, sources: list[Tensor], shard_of: np.ndarray, row_of: np.ndarray,
                 d_in: int):
        self.dtype = sources[0].dtype
        self.sources = [t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
                        for t in sources]
        self.shard_of = shard_of
        self.row_of = row_of
        self.stride = max(len(t) for t in sources) + 1
        self.d_in = d_in
        self.step = max(1, _SERIAL_ELEMENTS // d_in)

    def rows(self, a: int, b: int) -> Tensor:
        # storage order inside the batch: a forward sweep through each shard, not random reads
        key = np.sort(self.shard_of[a:b] * self.stride + self.row_of[a:b])
        shard, row = key // self.stride, key % self.stride
        out = torch.empty(b - a, self.d_in, dtype=torch.float32)
        if len(self.sources) == 1:
            self._gather(out, self.sources[0], row)
            return out
        bounds = np.searchsorted(shard, np.arange(len(self.sources) + 1))
        for i, src in enumerate(self.sources):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi > lo:
                self._gather(out[lo:hi], src, row[lo:hi])
        return out

    def _gather(self, out: Tensor, src: np.ndarray, rows: np.ndarray) -> None:
        if self.dtype == torch.float32:
            np.take(src, rows, axis=0, out=out.numpy(), mode="clip")  # "raise" would buffer out
            return
        picked = torch.from_numpy(np.take(src, rows, axis=0, mode="clip"))
        if self.dtype == torch.bfloat16:
            picked = picked.view(torch.bfloat16)
        for i in range(0, len(rows), self.step):
            out[i:i + self.step].copy_(picked[i:i + self.step])


# torch parallelises element-wise copies above 32768 elements; smaller copies stay serial.
_SERIAL_ELEMENTS = 32768
