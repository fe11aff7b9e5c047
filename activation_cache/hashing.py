"""sha256 of model files and folders (what a model's identity records), remembered so a large
file is read once: in memory and in ``cache_root()/file-hashes.json``, keyed by (real path, size,
mtime). ``cache_root()`` is also where converted models are kept (:mod:`.model_loading`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted models and file hashes are cached: $SAE_SWEEP_CACHE_DIR, else
    $XDG_CACHE_HOME/sae-sweep, else ~/.cache/sae-sweep."""
    env = os.environ.get("SAE_SWEEP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sae-sweep"


_hash_memo: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered (in memory and on disk) by (real path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_memo:
            return _hash_memo[key]
    disk_key = f"{key[0]}|{key[1]}|{key[2]}"
    store = cache_root() / "file-hashes.json"
    known = _read_json(store)
    digest = known.get(disk_key)
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()
        known = _read_json(store)
        known[disk_key] = digest
        _write_json_atomic(store, known)
    with _hash_lock:
        _hash_memo[key] = digest
    return digest


def dir_sha256(path: Path) -> str:
    """sha256 over the (relative name, sha256) of every regular, non-hidden file below ``path``."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(f"{rel}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs re-hashing next time
        log.debug("could not record file hashes in %s: %s", path, exc)
