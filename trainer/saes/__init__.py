"""The SAE architectures: one file each, every one registering itself (trainer/registry.py).

``base.SAE`` is the abstract base (persistence, scaling, the unit-norm decoder, dead-latent
tracking) and states the seam an architecture fills in; ``registration`` holds ``@register``;
``auxk`` holds what the k-sparse ones share, ``threshold`` the options of a batch-derived
inference threshold. Adding an architecture is adding a file here and importing it below (ARCHITECTURE.md
walks through it).
"""

from . import (batchtopk, batchtopk_transcoder, jumprelu, matryoshka,  # noqa: F401
               skip_transcoder, standard, topk)  # (registration)

DEFAULT_ARCHITECTURE = "batchtopk"
"""The architecture of a flat SAE config that names none."""
from .base import SAE, SAEDescription, SAELensFormat, TrainingProgress, TrainStepOutput

__all__ = ["SAE", "SAEDescription", "SAELensFormat", "TrainingProgress", "TrainStepOutput"]
