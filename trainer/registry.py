"""Architecture name -> SAE class, and the two ways to get an SAE: build new or load saved."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .batchtopk import BatchTopKSAE
from .sae import SAE
from .sae_config import SAEConfig

SAE_REGISTRY: dict[str, type[SAE]] = {
    "standard": SAE,
    "batchtopk": BatchTopKSAE,
}


def build_sae(cfg: SAEConfig, *, seed: Optional[int] = None) -> SAE:
    """A freshly initialised SAE of the class ``cfg.architecture`` names (seeded if ``seed``)."""
    return SAE_REGISTRY[cfg.architecture](cfg, seed=seed)


def load_sae(path: str | Path, device: Optional[str] = None) -> SAE:
    """Load an SAE saved with ``sae.save`` (or a training checkpoint folder) as the right class."""
    return SAE.load(path, device=device)
