"""What the architectures with a batch-derived inference threshold share: its options.

BatchTopK (saes/batchtopk.py) and the architectures built on it (Matryoshka BatchTopK, the
BatchTopK transcoders) train with a batch-level selection and ship a JumpReLU with one fp32
threshold theta. theta follows training as an EMA of each step's smallest selected activation
(after a warm-up) and is finally calibrated on training tokens so that the inference L0 is
``top_k``. These are the fields that rule reads (flat keys of the ``sae:`` block, like every
architecture field); they used to be ``training:`` fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..architecture_options import ArchitectureOptions, require_int, require_number


@dataclass
class ThresholdOptions(ArchitectureOptions):
    """The inference threshold's EMA and calibration (module docstring)."""

    threshold_warmup_steps: int = 1000
    """The fp32 EMA of the smallest selected activation starts after this many steps (earlier
    minima are meaningless); capped at half the run's steps."""
    threshold_beta: float = 0.999
    """EMA decay of the inference threshold."""
    calibrate_threshold: bool = True
    """At the end (and for every evaluation and ``best/`` copy), set the threshold on training
    tokens in their own order so that the inference L0 equals top_k there."""
    calibration_tokens: int = 16384
    """Tokens used for that calibration."""

    def validate(self) -> None:
        super().validate()
        require_int(self, "threshold_warmup_steps", low=0)
        require_number(self, "threshold_beta", low=0.0, high=1.0, high_strict=True)
        if not isinstance(self.calibrate_threshold, bool):
            self._fail("calibrate_threshold",
                       f"must be true or false, got {self.calibrate_threshold!r}")
        require_int(self, "calibration_tokens", low=1)

    def threshold_start(self, total_steps: int) -> int:
        """Steps after which the EMA runs: the warm-up, capped at half the run."""
        return min(self.threshold_warmup_steps, total_steps // 2)
