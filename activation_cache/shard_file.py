"""One shard file: safetensors bytes with a per-tensor checksum, read back by byte ranges.

Layout (standard safetensors, so ``safetensors.safe_open`` can memory-map a local shard): an
8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
``data_offsets``, then the raw tensor bytes. On encoding we record, per tensor, its absolute byte
range and the sha256 of those bytes, plus the sha256 of the whole file; the manifest keeps them.

Reading one tensor (say the activations of one hook) then costs one ranged read of exactly its
bytes -- from a local disk or an object store alike -- and verifying it costs hashing only those
bytes (about 1-2 GB/s on one core). See :mod:`activation_cache.reader` for when it is verified.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from typing import Mapping

import numpy as np
import safetensors.torch
import torch

from .cache_errors import CorruptCacheError
from .storage import RangeReader

_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8,
    "I8": torch.int8, "BOOL": torch.bool,
}
# numpy has no bfloat16: its bytes are read as int16 and reinterpreted by torch.
_NP_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": np.int16, "F64": np.float64, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_,
}


def encode_shard(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, dict]:
    """Safetensors bytes for ``tensors`` and the record {sha256, bytes, tensors: {name: entry}}.

    Each entry holds dtype, shape, absolute offset, byte length and sha256 of that tensor.
    """
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    base = 8 + hlen
    view = memoryview(data)
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        entries[name] = {
            "dtype": meta["dtype"], "shape": list(meta["shape"]), "offset": base + start,
            "bytes": end - start, "sha256": hashlib.sha256(view[base + start:base + end]).hexdigest(),
        }
    record = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "tensors": entries}
    return data, record


def read_header(reader: RangeReader) -> dict:
    """The safetensors header of an open shard (tensor name -> dtype, shape, offsets)."""
    (hlen,) = struct.unpack("<Q", bytes(reader.read(0, 8)))
    if hlen > 100_000_000:
        raise CorruptCacheError(f"{reader.name}: not a safetensors file (header length {hlen})")
    try:
        header = json.loads(bytes(reader.read(8, hlen)))
    except json.JSONDecodeError as exc:
        raise CorruptCacheError(f"{reader.name}: safetensors header is not valid JSON: {exc}") from None
    header.pop("__metadata__", None)
    return header


def map_array(path: str, entry: Mapping, *, verify: bool, name: str) -> np.ndarray:
    """Memory-map one tensor of a local shard as a read-only numpy array (no copy: a view of the
    file's pages in the page cache; bfloat16 bytes appear as int16).

    The mapping is *populated* where the OS supports it (``MAP_POPULATE``): its page tables are
    filled in one pass when it is created (reading the bytes from disk if they are not cached
    yet) instead of one page fault per page as rows are first touched. ``verify`` hashes the
    mapped bytes and compares with the manifest.
    """
    np_dtype = np.dtype(_NP_DTYPES[entry["dtype"]])
    offset, nbytes = int(entry["offset"]), int(entry["bytes"])
    shape = tuple(entry["shape"])
    try:
        if nbytes == 0:
            arr = np.zeros(shape, dtype=np_dtype)
        else:
            base = offset - offset % mmap.ALLOCATIONGRANULARITY
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), offset + nbytes - base, prot=mmap.PROT_READ,
                                   flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                   offset=base)
            arr = np.frombuffer(mapped, dtype=np_dtype, count=nbytes // np_dtype.itemsize,
                                offset=offset - base).reshape(shape)
    except (ValueError, OSError) as exc:  # e.g. the file is shorter than the tensor
        raise CorruptCacheError(f"{path}: cannot map tensor {name!r}: {exc}") from None
    if verify and hashlib.sha256(arr.reshape(-1).view(np.uint8)).hexdigest() != entry["sha256"]:
        raise CorruptCacheError(
            f"{path}: tensor {name!r} fails its sha256 check (the file is corrupted or was "
            "changed after the build); rebuild the cache"
        )
    return arr


def read_tensor(reader: RangeReader, entry: Mapping, *, verify: bool, name: str,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or rows [a, b) of its first dimension) described by a manifest entry.

    ``verify`` hashes the bytes and compares with ``entry["sha256"]`` (whole tensors only).
    """
    shape = list(entry["shape"])
    offset, nbytes = int(entry["offset"]), int(entry["bytes"])
    if rows is not None:
        row_bytes = nbytes // shape[0] if shape[0] else 0
        a, b = rows
        offset, nbytes, shape = offset + a * row_bytes, (b - a) * row_bytes, [b - a] + shape[1:]
    data = reader.read(offset, nbytes)
    if verify and rows is None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise CorruptCacheError(
                f"{reader.name}: tensor {name!r} fails its sha256 check (the file is corrupted "
                "or was changed after the build); rebuild the cache"
            )
    dt = entry["dtype"]
    arr = np.frombuffer(data, dtype=_NP_DTYPES[dt])
    t = torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)
    if dt == "BF16":
        t = t.view(torch.bfloat16)
    return t.reshape(shape)
