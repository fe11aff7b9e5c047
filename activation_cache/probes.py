"""Probe sets: labelled texts whose pooled activations a cache stores for sparse probing.

The ``probes:`` section of a cache YAML names them (:class:`ProbesSpec`): datasets of the
sae-probes benchmark (Kantamneni et al. 2025, "Are Sparse Autoencoders Useful? A Case Study in
Sparse Probing"; its wheel ships the labelled texts, read here from its data folder without
importing it) and/or a user's files (:class:`ProbeFileSpec`: JSONL, Parquet or CSV with a text
and a label column). At build time the cache runs its model once over every text and stores,
for every cached hook, the activation at the **last token** of the text (what sae-probes pools:
the position of the last real token; a longer text keeps its last ``max_text_tokens`` tokens,
BOS included when the cache prepends one). A trial never runs the model for probing: the
``probing`` evaluator (trainer/evaluators/probing.py) reads these pooled rows.

Only binary sets: a sae-probes dataset must be one its metadata marks "Binary Classification"
(113 of its 155); a user's file must hold exactly two labels. Labels are coded 0/1 in sorted
order of their values (as sklearn's LabelEncoder does).

**Sampling and parts** (deterministic in ``seed`` and the set's name): each label's texts are
shuffled by a generator seeded with (seed, crc32 of the name); at most ``texts_per_set`` texts
are kept, each label keeping its share (sae-probes' sets are balanced, so these stay balanced),
and each label's kept texts are cut into the probe **train** part (the rest), **val**
(``val_fraction``) and **test** (``test_fraction``) parts -- stratified, so every part has both
labels. The probe parts are unrelated to the cache's train/val/test token splits; they play the
same roles: the probe is fitted on train, selection figures use val, reported figures use test.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError
from .strict_config import StrictConfig, is_int

PARTS = ("train", "val", "test")
"""The probe parts, coded 0, 1, 2 in a set's ``part`` tensor."""

DEFAULT_PROBE_DATASETS = (
    "hist_fig_ismale", "glue_sst2", "glue_cola", "nyc_borough_Manhattan",
    "world_country_United_Kingdom", "art_type_book", "athlete_sport_football", "click_bait",
)
"""The default subset of sae-probes' binary datasets: eight short-text sets (median 12-71
characters) of different kinds (entity facts, sentiment, grammaticality, headline style), so a
cache's probes build in a few minutes on 2 CPU cores."""

SAE_PROBES_PIN = "sae-probes==0.4.2"
POOLING = "last token"
"""Which token of a text a probe set stores (what sae-probes pools)."""


class ProbeError(UserError):
    """A probe set cannot be read or used (missing file or column, not two labels...)."""


@dataclass
class ProbeFileSpec(StrictConfig):
    """A user's labelled texts: one row per text."""

    path: str = ""
    """A .jsonl, .parquet or .csv file."""
    name: Optional[str] = None
    """The set's name in the cache (default: the file name without its extension)."""
    text_column: str = "text"
    """The column (JSONL key) holding the text."""
    label_column: str = "label"
    """The column holding the label: exactly two distinct values."""

    def validate(self) -> None:
        self._require(isinstance(self.path, str) and self.path.strip() != "", "path",
                      "give the file of labelled texts (.jsonl, .parquet or .csv)")
        self._require(Path(self.path).suffix.lower() in _READERS, "path",
                      f"{self.path!r}: use a .jsonl, .parquet or .csv file")
        if self.name is not None:
            self._require(isinstance(self.name, str) and self.name.strip() != "", "name",
                          "must be a non-empty string or null (the file name)")
        for col in ("text_column", "label_column"):
            value = getattr(self, col)
            self._require(isinstance(value, str) and value != "", col,
                          f"must be a column name, got {value!r}")

    @property
    def set_name(self) -> str:
        return self.name or Path(self.path).stem


@dataclass
class ProbesSpec(StrictConfig):
    """The ``probes:`` section of a cache YAML (see the module docstring)."""

    datasets: Optional[tuple[str, ...]] = None
    """sae-probes binary datasets by tag (``glue_sst2``) or numbered tag (``92_glue_sst2``);
    null: the default subset (DEFAULT_PROBE_DATASETS) when no ``files`` are given, else none."""
    files: tuple[ProbeFileSpec, ...] = ()
    """A user's labelled files (see ProbeFileSpec)."""
    texts_per_set: int = 300
    """At most this many texts per set (each label keeps its share)."""
    val_fraction: float = 0.2
    """Share of each set's texts in its probe val part (selection figures)."""
    test_fraction: float = 0.3
    """Share in its probe test part (reported figures); the rest is the probe train part."""
    max_text_tokens: int = 128
    """A longer text keeps its last this many tokens (BOS included); at most the model's n_ctx."""
    seed: int = 0
    """Seed of the sampling and of the train/val/test parts."""

    def validate(self) -> None:
        self._require(is_int(self.texts_per_set) and self.texts_per_set >= 20, "texts_per_set",
                      f"must be an integer >= 20, got {self.texts_per_set!r}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            self._require(isinstance(value, (int, float)) and 0 < value < 1, name,
                          f"must be in (0, 1), got {value!r}")
        self._require(self.val_fraction + self.test_fraction <= 0.8, "test_fraction",
                      f"val_fraction + test_fraction must be <= 0.8 (texts must remain to fit "
                      f"the probe), got {self.val_fraction} + {self.test_fraction}")
        self._require(is_int(self.max_text_tokens) and self.max_text_tokens >= 2,
                      "max_text_tokens", f"must be an integer >= 2, got {self.max_text_tokens!r}")
        self._require(is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        if self.datasets is not None:
            self._require(isinstance(self.datasets, (list, tuple)), "datasets",
                          f"must be a list of sae-probes dataset names, got {self.datasets!r}")
            for name in self.datasets:
                self._require(isinstance(name, str), "datasets",
                              f"dataset names are strings, got {name!r}")
                try:
                    sae_probes_dataset(name)
                except ProbeError as exc:
                    self._fail("datasets", str(exc))
        names = self.set_names()
        dup = sorted({n for n in names if names.count(n) > 1})
        self._require(not dup, "files" if self.files else "datasets",
                      f"probe set(s) named more than once: {', '.join(dup)} (give a file a "
                      "`name:`)")
        self._require(bool(names), "datasets",
                      "names no probe set; list sae-probes datasets or files, or remove `probes:`")

    @property
    def dataset_names(self) -> tuple[str, ...]:
        """The sae-probes datasets this section names (canonical tags)."""
        if self.datasets is None:
            return () if self.files else DEFAULT_PROBE_DATASETS
        return tuple(sae_probes_dataset(n).tag for n in self.datasets)

    def set_names(self) -> list[str]:
        """Every probe set's name, datasets first, in order."""
        return list(self.dataset_names) + [f.set_name for f in self.files]


# --------------------------------------------------------------------------------------------
# sae-probes' datasets (read from its wheel's data folder; the package is not imported)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaeProbesDataset:
    tag: str
    """Its tag, e.g. ``glue_sst2``."""
    numbered: str
    """Its numbered tag (sae-probes' own name), e.g. ``92_glue_sst2``."""
    file: Path
    """Its ``cleaned_data/*.csv.zst``."""


def sae_probes_data_dir() -> Path:
    """sae-probes' data folder (ProbeError when the package is not installed)."""
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise ProbeError(f"sae-probes datasets need the sae-probes package: scripts/setup.sh "
                         f"installs it, or `pip install --no-deps {SAE_PROBES_PIN}`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@functools.lru_cache(maxsize=None)
def sae_probes_catalog() -> dict[str, SaeProbesDataset]:
    """sae-probes' binary classification datasets by tag (from its metadata table)."""
    import pandas as pd

    data = sae_probes_data_dir()
    table = pd.read_csv(data / "probing_datasets_MASTER.csv.zst", compression="zstd")
    binary = table[table["Data type"] == "Binary Classification"]
    out = {}
    for tag, save_name in zip(binary["Dataset Tag"], binary["Dataset save name"]):
        file = data / f"{save_name}.zst"
        out[str(tag)] = SaeProbesDataset(str(tag), Path(save_name).name.split(".")[0], file)
    return out


@functools.lru_cache(maxsize=None)
def _other_sae_probes_tags() -> frozenset[str]:
    import pandas as pd

    table = pd.read_csv(sae_probes_data_dir() / "probing_datasets_MASTER.csv.zst",
                        compression="zstd")
    rest = table[table["Data type"] != "Binary Classification"]
    return frozenset(map(str, rest["Dataset Tag"]))


def sae_probes_dataset(name: str) -> SaeProbesDataset:
    """The binary sae-probes dataset named ``name`` (tag or numbered tag); a one-line
    ProbeError with the closest names otherwise."""
    catalog = sae_probes_catalog()
    if name in catalog:
        return catalog[name]
    for ds in catalog.values():
        if ds.numbered == name:
            return ds
    bare = re.sub(r"^\d+_", "", name)
    if bare in _other_sae_probes_tags():
        raise ProbeError(f"sae-probes dataset {name!r} is not a binary classification set "
                         "(only binary ones can be probed)")
    close = difflib.get_close_matches(bare, list(catalog), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ProbeError(f"unknown sae-probes dataset {name!r}{hint} ({len(catalog)} binary sets, "
                     f"e.g. {', '.join(DEFAULT_PROBE_DATASETS[:3])})")


# --------------------------------------------------------------------------------------------
# texts, labels and parts
# --------------------------------------------------------------------------------------------


@dataclass
class ProbeTexts:
    """One probe set's kept texts, before the model runs."""

    name: str
    source: str
    """``sae-probes:92_glue_sst2`` or the user's file path."""
    texts: list[str]
    labels: np.ndarray  # [n] int64, 0/1
    parts: np.ndarray  # [n] int8: 0 train, 1 val, 2 test
    rows: np.ndarray  # [n] int64: row of each text in its source
    classes: tuple[str, str]
    """The label values coded 0 and 1 (as text)."""
    extra: dict = field(default_factory=dict)


MIN_PER_LABEL = 10
"""A set needs at least this many texts of each label (to give every part both labels)."""


def load_probe_texts(spec: ProbesSpec) -> list[ProbeTexts]:
    """Every probe set the section names, sampled and cut into parts (module docstring).
    One-line ProbeErrors for a missing file or column or a set without two labels."""
    out = []
    for tag in spec.dataset_names:
        ds = sae_probes_dataset(tag)
        frame = _read_frame(ds.file, "prompt", "target", f"sae-probes dataset {tag}")
        out.append(_sample(tag, f"sae-probes:{ds.numbered}", frame["prompt"], frame["target"],
                           spec))
    for f in spec.files:
        where = f"ProbesSpec.files: {f.path}"
        frame = _read_frame(Path(f.path), f.text_column, f.label_column, where)
        out.append(_sample(f.set_name, f.path, frame[f.text_column], frame[f.label_column],
                           spec))
    return out


def _read_jsonl(path: Path):
    import pandas as pd

    return pd.read_json(path, lines=True)


def _read_parquet(path: Path):
    import pandas as pd

    return pd.read_parquet(path)


def _read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path, compression="infer")


_READERS = {".jsonl": _read_jsonl, ".parquet": _read_parquet, ".csv": _read_csv,
            ".zst": _read_csv}


def _read_frame(path: Path, text_col: str, label_col: str, where: str):
    if not path.is_file():
        raise ProbeError(f"{where}: file not found")
    try:
        frame = _READERS[path.suffix.lower()](path)
    except (ValueError, OSError) as exc:
        raise ProbeError(f"{where}: cannot read it: {' '.join(str(exc).split())[:200]}") from None
    for col in (text_col, label_col):
        if col not in frame.columns:
            close = difflib.get_close_matches(col, [str(c) for c in frame.columns], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ProbeError(f"{where}: has no column {col!r}{hint}; its columns: "
                             f"{', '.join(map(str, frame.columns[:10]))}")
    return frame[[text_col, label_col]].dropna()


def _sample(name: str, source: str, texts, labels, spec: ProbesSpec) -> ProbeTexts:
    texts = [str(t) for t in texts]
    raw = np.asarray([str(v) for v in labels])
    values = sorted(set(raw.tolist()), key=_label_key)
    if len(values) != 2:
        shown = ", ".join(values[:5]) + (", ..." if len(values) > 5 else "")
        raise ProbeError(f"probe set {name!r} ({source}): needs exactly two labels, found "
                         f"{len(values)} ({shown})")
    coded = (raw == values[1]).astype(np.int64)
    counts = [int((coded == c).sum()) for c in (0, 1)]
    if min(counts) < MIN_PER_LABEL:
        raise ProbeError(f"probe set {name!r} ({source}): label {values[counts.index(min(counts))]!r} "
                         f"has {min(counts)} texts; each label needs at least {MIN_PER_LABEL}")
    rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
    n_total = len(coded)
    keep_total = min(spec.texts_per_set, n_total)
    rows, parts = [], []
    for c in (0, 1):
        idx = np.flatnonzero(coded == c)
        idx = idx[rng.permutation(len(idx))]
        n = max(MIN_PER_LABEL, int(round(keep_total * len(idx) / n_total)))
        idx = idx[:n]
        n_val = max(1, int(round(n * spec.val_fraction)))
        n_test = max(1, int(round(n * spec.test_fraction)))
        part = np.zeros(n, dtype=np.int8)
        part[:n_val] = 1
        part[n_val:n_val + n_test] = 2
        rows.append(idx)
        parts.append(part)
    row = np.concatenate(rows)
    part = np.concatenate(parts)
    order = rng.permutation(len(row))  # mix the labels
    row, part = row[order], part[order]
    return ProbeTexts(name=name, source=source, texts=[texts[i] for i in row],
                      labels=coded[row], parts=part, rows=row.astype(np.int64),
                      classes=(values[0], values[1]))


def _label_key(value: str):
    """Sort labels as numbers when they all are (0 < 1 < 10), else as text."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def probe_file_name(name: str) -> str:
    """A probe set's file stem in the cache (``probes/STEM.safetensors``): its name with
    anything but letters, digits, ``-``, ``_`` and ``.`` replaced, plus a short hash of the
    name so that two names never share a file."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "set"
    return f"{safe[:60]}-{zlib.crc32(name.encode()):08x}"


@dataclass
class ProbeSet:
    """A probe set as a cache stores it (``CacheReader.probe_set(name)``)."""

    name: str
    source: str
    classes: tuple[str, str]
    acts: dict  # hook -> float32 [n, d]: the pooled (last-token) activation of every text
    labels: "object"  # torch int64 [n], 0/1
    parts: "object"  # torch int8 [n]: 0 train, 1 val, 2 test

    def part(self, part: str, hook: str):
        """``(X [m, d] float32, y [m] int64)``: the texts of one part (train, val or test)."""
        if part not in PARTS:
            raise ProbeError(f"unknown probe part {part!r}: use one of {', '.join(PARTS)}")
        if hook not in self.acts:
            raise ProbeError(f"probe set {self.name!r} has no activations of hook {hook!r} "
                             f"(it stores {', '.join(self.acts)})")
        mask = self.parts == PARTS.index(part)
        return self.acts[hook][mask], self.labels[mask]

    def __len__(self) -> int:
        return int(self.labels.shape[0])
