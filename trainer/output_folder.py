"""Output folders: what a writer may replace, and the atomic replacement itself.

No command deletes what it did not write. Every folder sae-sweep writes as a whole (a saved SAE
-- ``final/``, ``best/`` --, a checkpoint, an export -- ``sae-sweep export --out``, ``train``'s
``saelens/``) and the output folder of ``sae-sweep train`` carries a marker file,
``.sae-sweep-output.json``: which kind of output it is, what wrote it, and the names it wrote.

A writer of kind K replaces (or writes into) a folder only when it is

* absent, or an empty folder;
* marked as kind K, and holding nothing but the names its marker lists (plus the marker and our
  own ``.NAME.tmp-PID`` / ``.NAME.old-PID`` leftovers of an interrupted write);
* or, for folders written before the marker existed, **unambiguously ours**: only the file
  names kind K writes, with its required files present (a saved SAE: ``config.json`` +
  ``weights.safetensors`` [+ ``history.json``], its config naming an architecture; a checkpoint:
  those + ``trainer_state.json`` + ``trainer_state.safetensors``; an export: SAELens
  ``cfg.json`` + ``sae_weights.safetensors`` whose metadata says ``exported_by: sae-sweep``, or
  a native SAE + ``README.md``, either with an optional ``README.md``; a training folder:
  ``job.yaml`` and at least one of ``checkpoints/``, ``final/``, ``best/``, ``saelens/``, and
  nothing else).

Anything else -- a user's file, a subfolder we did not write, another kind of our outputs (an
export over ``train``'s ``final/``) -- is refused with :class:`OutputFolderError`, one line
naming the folder and how to choose another; nothing is deleted. A path that is a file, a
symbolic link, the filesystem root, the home folder (or above it), the current folder (or above
it) or a folder holding the sae-sweep project is refused whatever it holds.

Replacing stays atomic (:func:`atomic_directory`): the new content is written into a temporary
sibling, the marker is added, the old folder is renamed aside, the new one renamed into place,
and only then is the old one (checked again to be ours) deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

from activation_cache import UserError

OUTPUT_MARKER = ".sae-sweep-output.json"
MARKER_VERSION = 1

KINDS = {
    "sae": "a saved SAE (train's final/ or best/)",
    "checkpoint": "a training checkpoint",
    "export": "an export (sae-sweep export, or train's saelens/)",
    "train": "a sae-sweep train output folder",
    "release": "a release (sae-sweep export --release: one export per hook and an index)",
}

TRAIN_ENTRIES = ("job.yaml", "checkpoints", "final", "best", "saelens")
"""What a ``sae-sweep train`` output folder holds (besides the marker)."""

_LEFTOVER = re.compile(r"^\..+\.(tmp|old)-\d+$")
"""The temporary siblings :func:`atomic_directory` names (left behind by a killed write)."""

_NATIVE = {"config.json", "weights.safetensors"}
_CHECKPOINT = _NATIVE | {"trainer_state.json", "trainer_state.safetensors"}
_SAELENS = {"cfg.json", "sae_weights.safetensors"}


class OutputFolderError(UserError, ValueError):
    """An output folder holds something sae-sweep did not write (or is a dangerous path)."""


# -- what is there ------------------------------------------------------------------------------


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def read_marker(path: str | Path) -> Optional[dict[str, Any]]:
    """The marker of the folder ``path`` (None when it has none or it is not ours)."""
    file = Path(path) / OUTPUT_MARKER
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "sae-sweep":
        return None
    return data


def _json_object(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _legacy_kind(path: Path, names: set[str]) -> Optional[str]:
    """The kind of an unmarked folder that holds only the files one of our writers writes."""
    files = {n for n in names if (path / n).is_file()}
    if files != names:  # a subfolder: only a training folder has those
        if "job.yaml" in files and names <= set(TRAIN_ENTRIES) and names & {
                "checkpoints", "final", "best", "saelens"}:
            return "train"
        return None

    def native_ok() -> bool:
        cfg = _json_object(path / "config.json")
        return isinstance(cfg.get("architecture"), str) and "d_sae" in cfg

    if _CHECKPOINT <= names <= _CHECKPOINT and native_ok():
        return "checkpoint"
    if _NATIVE <= names <= _NATIVE | {"history.json"} and native_ok():
        return "sae"
    if _NATIVE | {"README.md"} <= names <= _NATIVE | {"history.json", "README.md"} and native_ok():
        return "export"
    if _SAELENS <= names <= _SAELENS | {"README.md"}:
        meta = _json_object(path / "cfg.json").get("metadata")
        if isinstance(meta, dict) and meta.get("exported_by") == "sae-sweep":
            return "export"
    return None


def _describe(path: Path, flag: Optional[str]) -> str:
    return f"{flag} {path}" if flag else str(path)


def _choose_another(flag: Optional[str]) -> str:
    if flag and flag.startswith("--"):
        return f"choose a new or empty folder ({flag} NEW_FOLDER)"
    if flag:  # a config field
        return f"choose a new or empty folder ({flag}: NEW_FOLDER, or --out NEW_FOLDER)"
    return "move those files away, or choose another output folder"


def _known(where: Any) -> Optional[Path]:
    """``where()`` resolved (``Path.home``, ``Path.cwd``), or None when it cannot be known."""
    try:
        return where().resolve()
    except (OSError, RuntimeError, KeyError):
        return None


def _dangerous(path: Path) -> Optional[str]:
    """Why ``path`` may never be an output folder (None when it may)."""
    resolved = path.resolve()
    project = Path(__file__).resolve().parents[1]
    if resolved == Path(resolved.anchor):
        return "is the filesystem root"
    home = _known(Path.home)
    if home is not None and home.is_relative_to(resolved):
        return "is your home folder" if resolved == home else "holds your home folder"
    cwd = _known(Path.cwd)
    if cwd is not None and cwd.is_relative_to(resolved):
        return "is the current folder" if resolved == cwd else "holds the current folder"
    if project.is_relative_to(resolved):
        return f"holds the sae-sweep project ({project})"
    return None


def check_output_folder(path: str | Path, kind: str, *, flag: Optional[str] = None) -> bool:
    """Raise :class:`OutputFolderError` unless a writer of ``kind`` may replace (or write into)
    ``path`` (module docstring); True when ``path`` exists (an empty folder or one of ours)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(path)
    where = _describe(path, flag)
    if path.is_symlink():
        raise OutputFolderError(f"{where}: is a symbolic link; give the folder itself, or "
                                f"{_choose_another(flag)}")
    if not path.exists():
        why = _dangerous(path)
        if why:  # e.g. a path under which the project lives cannot be absent, but be safe
            raise OutputFolderError(f"{where}: {why}; {_choose_another(flag)}")
        return False
    if not path.is_dir():
        raise OutputFolderError(f"{where}: is a file, not a folder; {_choose_another(flag)}")
    why = _dangerous(path)
    if why:
        raise OutputFolderError(f"{where}: {why}; {_choose_another(flag)}")
    names = set(_entries(path))
    ours = {n for n in names if _LEFTOVER.match(n)}
    if not names - ours:
        return True
    marker = read_marker(path)
    if marker is not None:
        found = marker.get("kind")
        allowed = set(marker.get("files") or ()) | {OUTPUT_MARKER} | ours
        foreign = sorted(names - allowed)
    else:
        found = _legacy_kind(path, names - ours)
        foreign = [] if found is not None else sorted(names - ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputFolderError(f"{where}: holds files sae-sweep did not write ({shown}); "
                                f"nothing was changed; {_choose_another(flag)}")
    if found != kind:
        what = KINDS.get(str(found), f"a sae-sweep output of kind {found!r}")
        raise OutputFolderError(f"{where}: is {what}, not {KINDS[kind]}; nothing was changed; "
                                f"{_choose_another(flag)}")
    if kind == "train":
        _check_train_parts(path)
    return True


def _check_train_parts(path: Path) -> None:
    """The parts of a training folder that its run replaces or deletes are ours too."""
    for name, kind in (("final", "sae"), ("best", "sae"), ("saelens", "export")):
        check_output_folder(path / name, kind)
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for entry in _entries(checkpoints):
            if not _LEFTOVER.match(entry):
                check_output_folder(checkpoints / entry, "checkpoint")
    elif checkpoints.exists():
        check_output_folder(checkpoints, "checkpoint")  # a file or a link: refused


def write_marker(folder: str | Path, kind: str, *, description: str = "",
                 files: Optional[list[str]] = None) -> Path:
    """Write the marker into ``folder``: ``kind``, what wrote it, and the names it holds
    (default: every entry there now)."""
    folder = Path(folder)
    names = sorted(files if files is not None else
                   (n for n in _entries(folder) if n != OUTPUT_MARKER))
    data = {"written_by": "sae-sweep", "kind": kind, "description": description or KINDS[kind],
            "files": names, "format_version": MARKER_VERSION}
    file = folder / OUTPUT_MARKER
    file.write_text(json.dumps(data, indent=1) + "\n")
    return file


# -- writing ---------------------------------------------------------------------------------


def claim_output_folder(path: str | Path, kind: str = "train", *, flag: Optional[str] = None,
                        description: str = "") -> Path:
    """Make ``path`` a folder a writer of ``kind`` writes into (it must be absent, empty or
    already ours: :func:`check_output_folder`) and mark it; return it. Nothing is deleted."""
    path = Path(path)
    check_output_folder(path, kind, flag=flag)
    path.mkdir(parents=True, exist_ok=True)
    files = list(TRAIN_ENTRIES) if kind == "train" else None
    write_marker(path, kind, description=description, files=files)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, kind: str, flag: Optional[str] = None,
                     description: str = "") -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` in one rename.

    ``path`` must be absent, an empty folder or an output of ``kind`` (checked before anything is
    written and again before the rename; :class:`OutputFolderError` otherwise). The marker is
    added to the new folder, listing what the caller wrote."""
    path = Path(path)
    check_output_folder(path, kind, flag=flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover (the name is ours and carries our PID)
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, kind, description=description)
        check_output_folder(path, kind, flag=flag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_output(path: str | Path, kind: str) -> bool:
    """Delete the folder ``path`` if it is an output of ``kind`` (True); leave anything else
    where it is (False: absent, or not ours)."""
    path = Path(path)
    try:
        if not check_output_folder(path, kind):
            return False
    except OutputFolderError:
        return False
    shutil.rmtree(path)
    return True
