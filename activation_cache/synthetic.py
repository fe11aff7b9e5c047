"""Synthetic activations from known sparse features: the ``synthetic:`` section of a cache YAML.

A synthetic cache holds activations generated, not computed by a model, so that what an SAE
recovers can be checked against the truth (trainer/evaluators/ground_truth.py). Each token is

    x = sum_i  f_i * m_i * d_i  +  noise_std * eps,        eps ~ N(0, I_d)

over ``n_features`` unit directions ``d_i`` in ``d`` dimensions (Gaussian, normalised: with more
features than dimensions they are in superposition), where feature i fires (f_i = 1) with
probability p_i and then has magnitude m_i ~ |N(magnitude_mean, magnitude_std)|. Firing
frequencies follow a power law, ``p_i = c * (i + 1) ** -frequency_exponent``, with c chosen so
that the expected number of active features per token is ``mean_active`` (feature 0 is the
most frequent). Options:

* ``correlation`` (rho in [0, 1)): firing is decided by Gaussians ``z_i = sqrt(rho) g +
  sqrt(1 - rho) e_i`` with one ``g`` per token shared by all features (f_i = z_i < Phi^-1(p_i)):
  features tend to fire together; each marginal frequency stays p_i.
* ``hierarchy: {parents: P, children_per_parent: C}``: features 0..P-1 are parents; the next
  P*C features are their children (children of parent j: P + j*C ... P + (j+1)*C - 1). A child
  fires only on a token where its parent fires (with probability min(1, p_child / p_parent)
  there), so its frequency is at most its parent's.

Determinism: window w's tokens come from a generator seeded with (seed, w), w counting the
windows of all splits in order (train, then val, then test), so a cache is the same whatever its
sharding, and the truth (directions, frequencies, parents) from ``seed`` alone. The splits are
consecutive runs of windows (``val_fraction``/``test_fraction`` of them); each window counts as
one document. The truth is stored with the cache (``ground_truth.safetensors``, its sha256 in
the manifest's ``synthetic`` entry) and read back by ``CacheReader.ground_truth()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .strict_config import StrictConfig, is_int

GROUND_TRUTH_FILE = "ground_truth.safetensors"
"""Where a synthetic cache stores its truth (directions, frequencies, parents)."""


@dataclass
class HierarchySpec(StrictConfig):
    """Parent/child features (see the module docstring)."""

    parents: int = 4
    """How many of the most frequent features are parents."""
    children_per_parent: int = 4
    """Children of each parent (the features right after the parents)."""

    def validate(self) -> None:
        for name in ("parents", "children_per_parent"):
            value = getattr(self, name)
            self._require(is_int(value) and value >= 1, name,
                          f"must be an integer >= 1, got {value!r}")


@dataclass
class SyntheticSpec(StrictConfig):
    """Activations from known sparse features (module docstring)."""

    n_features: int = 512
    """How many true features (unit directions)."""
    d: int = 64
    """Width of the activations."""
    num_tokens: int = 100_000
    """Tokens generated over all splits (rounded up to whole windows of max_text_length)."""
    mean_active: float = 8.0
    """Expected number of features active per token (sets the frequencies' scale)."""
    frequency_exponent: float = 0.5
    """Power-law exponent of the firing frequencies, p_i ~ (i + 1) ** -exponent (0: equal)."""
    magnitude_mean: float = 1.0
    """Mean of an active feature's magnitude (before the absolute value)."""
    magnitude_std: float = 0.25
    """Standard deviation of an active feature's magnitude."""
    noise_std: float = 0.01
    """Standard deviation of the isotropic Gaussian noise added to every token (per dimension)."""
    correlation: float = 0.0
    """Correlation of the Gaussians behind the features' firing (0: independent)."""
    hierarchy: Optional[HierarchySpec] = None
    """Parent/child features (None: none)."""
    seed: int = 0
    """Seeds the directions and every window's tokens."""

    def validate(self) -> None:
        for name in ("n_features", "d", "num_tokens"):
            value = getattr(self, name)
            self._require(is_int(value) and value >= 1, name,
                          f"must be an integer >= 1, got {value!r}")
        self._require(is_int(self.seed) and self.seed >= 0, "seed",
                      f"must be an integer >= 0, got {self.seed!r}")
        for name in ("mean_active", "magnitude_mean"):
            value = getattr(self, name)
            self._require(_number(value) and value > 0, name, f"must be > 0, got {value!r}")
        for name in ("frequency_exponent", "magnitude_std", "noise_std"):
            value = getattr(self, name)
            self._require(_number(value) and value >= 0, name, f"must be >= 0, got {value!r}")
        self._require(_number(self.correlation) and 0 <= self.correlation < 1, "correlation",
                      f"must be in [0, 1), got {self.correlation!r}")
        if self.hierarchy is not None:
            h = self.hierarchy
            used = h.parents * (1 + h.children_per_parent)
            self._require(used <= self.n_features, "hierarchy",
                          f"{h.parents} parents with {h.children_per_parent} children each need "
                          f"{used} features, but n_features is {self.n_features}")
        if _number(self.mean_active) and self.mean_active > 0:
            top = float(frequencies(self)[0])
            self._require(top <= 1.0, "mean_active",
                          f"{self.mean_active} active features per token needs the most "
                          f"frequent feature to fire with probability {top:.3g} > 1; lower "
                          "mean_active or frequency_exponent, or raise n_features")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def frequencies(spec: SyntheticSpec) -> torch.Tensor:
    """The marginal firing probabilities p_i (float64 [n_features]): the power law scaled to
    ``mean_active`` expected active features per token."""
    raw = torch.arange(1, spec.n_features + 1, dtype=torch.float64) ** -float(
        spec.frequency_exponent)
    return raw * (float(spec.mean_active) / float(raw.sum()))


def parents(spec: SyntheticSpec) -> torch.Tensor:
    """int64 [n_features]: each feature's parent, -1 for none."""
    out = torch.full((spec.n_features,), -1, dtype=torch.int64)
    if spec.hierarchy is not None:
        p, c = spec.hierarchy.parents, spec.hierarchy.children_per_parent
        for j in range(p):
            out[p + j * c:p + (j + 1) * c] = j
    return out


@dataclass
class GroundTruth:
    """The truth behind a synthetic cache."""

    directions: torch.Tensor
    """float32 [n_features, d]: unit feature directions."""
    frequencies: torch.Tensor
    """float32 [n_features]: each feature's target firing probability (children: at most
    their parent's)."""
    parents: torch.Tensor
    """int64 [n_features]: each feature's parent, -1 for none."""
    hook: str = ""
    """The cache hook the activations are stored under."""
    spec: dict = field(default_factory=dict)
    """The SyntheticSpec as a dict."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"directions": self.directions.contiguous(),
                "frequencies": self.frequencies.contiguous(), "parents": self.parents}


def ground_truth(spec: SyntheticSpec, hook: str = "") -> GroundTruth:
    """Directions (from ``seed`` alone), frequencies and parents of ``spec``."""
    g = torch.Generator().manual_seed(int(spec.seed))
    directions = torch.randn(spec.n_features, spec.d, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    freq = frequencies(spec)
    par = parents(spec)
    has = par >= 0
    freq = freq.clone()
    freq[has] = torch.minimum(freq[has], freq[par[has]])
    return GroundTruth(directions.float(), freq.float(), par, hook, spec.to_dict())


def window_seed(spec: SyntheticSpec, window: int) -> int:
    """The seed of global window ``window``'s tokens."""
    return (int(spec.seed) * 1_000_003 + int(window) * 7_919 + 1) % (2**63 - 1)


def generate_window_codes(spec: SyntheticSpec, truth: GroundTruth, window: int,
                          n_tokens: int) -> torch.Tensor:
    """float32 [n_tokens, n_features]: the feature activations f_i * m_i of one window."""
    g = torch.Generator().manual_seed(window_seed(spec, window))
    n = spec.n_features
    p = frequencies(spec).to(torch.float64)
    par = truth.parents
    if spec.correlation > 0:
        rho = float(spec.correlation)
        shared = torch.randn(n_tokens, 1, generator=g, dtype=torch.float64)
        own = torch.randn(n_tokens, n, generator=g, dtype=torch.float64)
        z = math.sqrt(rho) * shared + math.sqrt(1 - rho) * own
        # fire when z < Phi^-1(p): z is N(0, 1), so each feature's marginal frequency is p
        fires = z < torch.special.ndtri(p.clamp(1e-12, 1 - 1e-12))
    else:
        fires = torch.rand(n_tokens, n, generator=g, dtype=torch.float64) < p
    has = par >= 0
    if bool(has.any()):
        # a child fires only where its parent fires, with probability p_child / p_parent there
        cond = (p[has] / p[par[has]]).clamp(max=1.0)
        child = torch.rand(n_tokens, int(has.sum()), generator=g, dtype=torch.float64) < cond
        fires[:, has] = child & fires[:, par[has]]
    mags = (torch.randn(n_tokens, n, generator=g) * float(spec.magnitude_std)
            + float(spec.magnitude_mean)).abs()
    return fires.float() * mags


def generate_window(spec: SyntheticSpec, truth: GroundTruth, window: int,
                    n_tokens: int) -> torch.Tensor:
    """float32 [n_tokens, d]: the activations of global window ``window``."""
    codes = generate_window_codes(spec, truth, window, n_tokens)
    g = torch.Generator().manual_seed(window_seed(spec, window) ^ 0x5DEECE66D)
    noise = torch.randn(n_tokens, spec.d, generator=g) * float(spec.noise_std)
    return codes @ truth.directions + noise
