"""The SAE architectures: one file each, every one registering itself (trainer/registry.py).

``base.SAE`` is the abstract base (persistence, scaling, the unit-norm decoder, dead-latent
tracking) and states the seam an architecture fills in; ``auxk`` holds what the k-sparse ones
share. Adding an architecture is adding a file here and importing it below (ARCHITECTURE.md
walks through it).
"""

from . import batchtopk, jumprelu, matryoshka, standard, topk  # noqa: F401  (registration)
from .base import SAE, SAELensFormat, TrainStepOutput

__all__ = ["SAE", "SAELensFormat", "TrainStepOutput"]
