"""Resumable checkpoints of a training run (no pickle: safetensors + JSON).

A checkpoint folder holds (see ARCHITECTURE.md):

* ``config.json`` + ``weights.safetensors`` -- the SAE, unfolded (``load_sae`` opens it too);
* ``trainer_state.safetensors`` -- Adam moments and step counters per parameter and the torch
  RNG states as uint8 tensors;
* ``trainer_state.json`` -- step, epoch, batch position, tokens seen, best metric, the metrics
  history, the objective's state and the TrainingConfig it was written with.

Folders are written atomically (``output_folder.atomic_directory``): into a temporary sibling that
is renamed into place, and only over a folder that is itself one of our checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointMismatchError
from .output_folder import atomic_directory
from .registry import read_sae_config
from .saes.base import CONFIG_FILE, WEIGHTS_FILE, SAE
from .training_config import RESUME_SAFE_FIELDS, TrainingConfig

STATE_TENSORS_FILE = "trainer_state.safetensors"
STATE_JSON_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
FORMAT_VERSION = 1


@dataclass
class TrainerState:
    """Loop counters and bookkeeping that a checkpoint restores."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    objective: dict[str, Any] = field(default_factory=dict)
    window: dict[str, Any] = field(default_factory=dict)
    """The loss window in progress (sums since the last report; empty at a report step), so the
    first record after resuming from a mid-window (Ctrl-C) checkpoint averages the same steps."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step_") and (p / STATE_JSON_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(path: str | Path, *, sae: SAE, optimizer: torch.optim.Optimizer,
                    state: TrainerState, config: TrainingConfig) -> Path:
    """Write a complete, resumable checkpoint folder at ``path`` (atomically)."""
    path = Path(path)
    names = {id(p): n for n, p in sae.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{name}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(name, {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {
        "format_version": FORMAT_VERSION,
        "training_config": config.to_dict(),
        "lr": [g["lr"] for g in optimizer.param_groups],
        "optimizer_scalars": scalars,
        **dataclasses.asdict(state),
    }
    with atomic_directory(path, kind="checkpoint") as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(sae.cfg.to_dict(), indent=2))
        save_file(tensors, str(tmp / STATE_TENSORS_FILE))
        (tmp / STATE_JSON_FILE).write_text(json.dumps(meta, indent=1))
    return path


def _differences(saved: dict[str, Any], current: dict[str, Any], ignore=frozenset()) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key), current.get(key)
        if a != b:
            out.append(f"{key} (checkpoint: {a!r}, now: {b!r})")
    return out


def load_checkpoint(path: str | Path, *, sae: SAE, optimizer: torch.optim.Optimizer,
                    config: TrainingConfig) -> TrainerState:
    """Restore ``sae``, ``optimizer`` and the RNG from ``path``; return the loop state.

    Raises CheckpointMismatchError naming the differing fields when the checkpoint was written
    with another SAE or training configuration (fields in RESUME_SAFE_FIELDS may differ).
    """
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE):
        if not (path / name).exists():
            raise CheckpointMismatchError(f"{path} is not a complete checkpoint ({name} missing)")
    saved_cfg = read_sae_config(path)
    diff = _differences(saved_cfg.to_dict(), sae.cfg.to_dict(), ignore={"device"})
    if diff:
        raise CheckpointMismatchError(
            f"{path}: checkpoint was written for another SAE config; differing fields: "
            + "; ".join(diff))
    try:
        meta = json.loads((path / STATE_JSON_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointMismatchError(f"{path / STATE_JSON_FILE}: not valid JSON: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{path / STATE_JSON_FILE}: format_version {meta.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}")
    try:
        saved_train = TrainingConfig.from_dict(meta["training_config"]).to_dict()
    except Exception as exc:
        raise CheckpointMismatchError(f"{path / STATE_JSON_FILE}: {exc}") from None
    diff = _differences(saved_train, config.to_dict(), ignore=RESUME_SAFE_FIELDS)
    if diff:
        raise CheckpointMismatchError(
            f"{path}: checkpoint was written with another training config; differing fields: "
            + "; ".join(diff) + ". Resume with the original values, or start over (a new output "
            "folder, or `sae-sweep train --no-resume`).")

    sae.load_weights(path / WEIGHTS_FILE)
    tensors = load_file(str(path / STATE_TENSORS_FILE))
    fresh = optimizer.state_dict()
    index = {n: i for i, (n, _) in enumerate(sae.named_parameters())}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        pname, skey = key[len("optim."):].rsplit(".", 1)
        if pname not in index:
            raise CheckpointMismatchError(f"{path}: optimizer state for unknown parameter {pname}")
        state.setdefault(index[pname], {})[skey] = value
    for pname, values in meta.get("optimizer_scalars", {}).items():
        state.setdefault(index[pname], {}).update(values)
    groups = fresh["param_groups"]
    for group, lr in zip(groups, meta["lr"]):
        group["lr"] = lr
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    fields = {f.name for f in dataclasses.fields(TrainerState)}
    return TrainerState(**{k: v for k, v in meta.items() if k in fields})
