"""Where a cache lives: a local folder or any pyarrow filesystem URI (``s3://bucket/prefix``...).

:class:`Storage` is the only code that touches files. Paths given to its methods are relative to
the cache root and always use ``/``.

Atomic writes (the basis of crash-safe, resumable builds):

* **local paths** -- the bytes go to ``NAME.tmp-<random>`` in the same folder, are flushed and
  fsynced, then renamed onto ``NAME`` with :func:`os.replace` (atomic on POSIX). A kill leaves at
  most a ``*.tmp-*`` file, which :meth:`Storage.remove_temporaries` deletes on the next build
  (only the temporaries of the cache's own files).
* **object stores** (S3, GCS... through pyarrow) -- an object becomes visible only when its
  upload completes (write-then-commit: a single PUT, or the final "complete multipart upload"),
  so the bytes are written straight to the final key; a killed upload leaves no object.

Remote URIs accept pyarrow's query options, e.g.
``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http``; credentials come from the
usual environment variables (``AWS_ACCESS_KEY_ID``...), never from the cache config.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.fs as pafs

from .cache_errors import CacheError, CorruptCacheError

TEMP_MARKER = ".tmp-"


class Storage:
    """A cache root on a local disk or in a pyarrow filesystem."""

    def __init__(self, uri: str | os.PathLike):
        text = str(uri)
        if not text:
            raise CacheError("cache location is empty: give a folder path or a URI like s3://b/p")
        if "://" in text and not text.startswith("file://"):
            try:
                fs, root = pafs.FileSystem.from_uri(text)
            except (pa.ArrowInvalid, ValueError, OSError) as exc:
                raise CacheError(f"cache location {text}: cannot open it: {exc}") from None
            self.uri = text
        else:
            path = text[len("file://"):] if text.startswith("file://") else text
            fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
            self.uri = root
        self.fs: pafs.FileSystem = fs
        self.root: str = root.rstrip("/")
        self.is_local = isinstance(fs, pafs.LocalFileSystem)

    # -- naming ------------------------------------------------------------------------------
    def full(self, rel: str) -> str:
        """The filesystem path of ``rel`` (for pyarrow calls)."""
        return f"{self.root}/{rel}" if rel else self.root

    def describe(self, rel: str) -> str:
        """How a file is named in messages: its local path or its URI."""
        if self.is_local:
            return str(Path(self.root) / rel)
        base = self.uri.split("?", 1)[0].rstrip("/")
        return f"{base}/{rel}"

    # -- queries -----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.full(rel)).type != pafs.FileType.NotFound

    def size(self, rel: str) -> int | None:
        """The size in bytes of a file, or None when it does not exist."""
        info = self.fs.get_file_info(self.full(rel))
        if info.type == pafs.FileType.NotFound:
            return None
        return int(info.size)

    def list(self, rel_dir: str) -> list[str]:
        """The files under ``rel_dir`` (recursive), as paths relative to the root."""
        sel = pafs.FileSelector(self.full(rel_dir), allow_not_found=True, recursive=True)
        prefix = self.root + "/"
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File:
                out.append(info.path[len(prefix):] if info.path.startswith(prefix) else info.path)
        return sorted(out)

    def sizes(self, rel_dir: str) -> dict[str, int]:
        """{relative path: size} of the files under ``rel_dir``, from one listing."""
        sel = pafs.FileSelector(self.full(rel_dir), allow_not_found=True, recursive=True)
        prefix = self.root + "/"
        return {
            (i.path[len(prefix):] if i.path.startswith(prefix) else i.path): int(i.size)
            for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File
        }

    # -- reading -----------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        try:
            if self.is_local:
                with open(self.full(rel), "rb") as f:
                    return f.read()
            with self.fs.open_input_file(self.full(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise CorruptCacheError(f"{self.describe(rel)}: file is missing") from None
        except OSError as exc:
            if not self.exists(rel):
                raise CorruptCacheError(f"{self.describe(rel)}: file is missing") from None
            raise CacheError(f"{self.describe(rel)}: cannot read: {exc}") from None

    def open_ranges(self, rel: str) -> "RangeReader":
        """A handle for reading byte ranges of one file (kept open by the caller)."""
        try:
            if self.is_local:
                return RangeReader(open(self.full(rel), "rb"), self.describe(rel))
            return RangeReader(self.fs.open_input_file(self.full(rel)), self.describe(rel))
        except (FileNotFoundError, OSError):
            if not self.exists(rel):
                raise CorruptCacheError(f"{self.describe(rel)}: file is missing") from None
            raise

    # -- writing -----------------------------------------------------------------------------
    def write_atomic(self, rel: str, data: bytes | memoryview) -> None:
        """Write ``data`` so that ``rel`` either holds all of it or does not change."""
        if self.is_local:
            final = self.full(rel)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}{TEMP_MARKER}{uuid.uuid4().hex[:12]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        with self.fs.open_output_stream(self.full(rel)) as f:
            f.write(data)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.full(rel))
        except FileNotFoundError:
            pass

    def is_file_or_missing(self) -> bool:
        """False when the root itself is an existing file (not a folder or prefix)."""
        return self.fs.get_file_info(self.root).type != pafs.FileType.File

    def remove_empty_folders(self) -> None:
        """Remove the empty folders under a local root (object stores have none)."""
        if not self.is_local:
            return
        for folder, _, _ in sorted(os.walk(self.root), key=lambda t: -len(t[0])):
            if folder != self.root and not os.listdir(folder):
                os.rmdir(folder)

    def remove_temporaries(self, owned: Callable[[str], bool]) -> int:
        """Delete the temp files a killed build left behind (``NAME.tmp-...`` of a file
        ``owned(NAME)`` says is ours; nothing else); returns how many."""
        n = 0
        for rel in self.list(""):
            base = rel.rsplit("/", 1)[-1]
            if TEMP_MARKER in base and owned(rel[:len(rel) - len(base)]
                                             + base.split(TEMP_MARKER, 1)[0]):
                self.delete(rel)
                n += 1
        return n


class RangeReader:
    """Reads byte ranges of one open file (local ``pread``-style or a pyarrow random access)."""

    def __init__(self, handle, name: str):
        self._h = handle
        self.name = name

    def read(self, offset: int, length: int) -> bytearray | memoryview:
        if isinstance(self._h, pa.NativeFile):
            buf = self._h.read_at(length, offset)
            data = memoryview(buf)
        else:  # into a writable buffer, so tensors can wrap it without another copy
            data = bytearray(length)
            view, got = memoryview(data), 0
            while got < length:
                n = os.preadv(self._h.fileno(), [view[got:]], offset + got)
                if n == 0:
                    break
                got += n
            if got < length:
                data = data[:got]
        if len(data) != length:
            raise CorruptCacheError(
                f"{self.name}: truncated: wanted bytes {offset}..{offset + length}, "
                f"file ends after {offset + len(data)}"
            )
        return data

    def close(self) -> None:
        self._h.close()

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
