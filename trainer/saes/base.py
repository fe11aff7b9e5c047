"""The SAE base class: what every architecture shares, and the seam each one fills in.

Conventions shared by every architecture:

* An SAE reads the input hook (width ``d_in``) and reconstructs a **target**: for an SAE the
  input itself, for a transcoder another hook (``SAEConfig.hook_spec_out``, width ``d_out``;
  its options say ``transcodes``).
* Parameters: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]`` (unit-norm
  rows during training), ``b_dec [d_out]`` (the output bias); an architecture may add its own
  (JumpReLU's threshold, a skip transcoder's ``W_skip``).
* The public methods (``encode``, ``decode``, ``forward``) take and return **raw** activations
  and are the **inference encoding** -- what ``export`` ships -- in train and eval mode alike.
  Internally inputs are multiplied by the fp32 buffer ``input_scale`` (chosen from data so that
  E||x|| = sqrt(d_in)) and targets by the output scale (:meth:`output_scaling`).
* **The two sides.** An SAE (``Options.transcodes`` false) has one scale for both sides and
  its ``b_dec`` is both the output bias and the input centre: ``pre = (x_s - b_dec) @ W_enc +
  b_enc`` (as SAELens with ``apply_b_dec_to_input``), ``x_hat = f @ W_dec + b_dec`` (then /
  input_scale). A transcoder has its own fp32 ``output_scale`` buffer (E||y|| = sqrt(d_out))
  and does not centre its input (``input_bias()`` is None): ``pre = x_s @ W_enc + b_enc``,
  ``y_hat = f @ W_dec + b_dec (+ skip)`` (then / output_scale), as SAELens's transcoders.
  ``fold_scaling`` folds both scales into the weights (W_enc * s_in, W_dec / s_out,
  b_dec / s_out, an architecture's own in ``fold_architecture``; scales 1) without changing any
  raw-input output; ``save`` folds by default. Encoder pre-activations are unchanged by that
  folding, so thresholds need no adjustment.
* Dead-latent tracking: ``ever_fired`` and ``num_batches_not_active`` (consecutive training
  batches without firing; a latent idle for ``n_batches_to_dead`` of them is dead).

The seam (what an architecture file ``trainer/saes/<name>.py`` provides; see ARCHITECTURE.md):

* ``architecture`` (its registered name) and ``Options`` (an ``ArchitectureOptions`` dataclass:
  its own config fields, their validation and what a sweep may search);
* ``encode_scaled(x_scaled)`` -- the inference encoding, in the scaled space;
* ``training_forward(x, target) -> TrainStepOutput`` -- the training encoding and every loss
  term of the architecture, with its own coefficients, as a typed record (no state between
  calls); ``target`` None or ``x`` itself: an SAE's batch (:meth:`scaled_pair` gives both
  sides in the scaled space);
* ``saelens_format(folded) -> SAELensFormat`` -- how it exports to SAELens;
* ``inference_rule`` -- one sentence saying what the shipped encoder does (model cards);
* optionally: ``update_running_statistics(running, progress)`` (see below), ``calibrate`` with
  the ``needs_calibration`` property (inference thresholds fitted on training tokens after
  training), ``inference_threshold`` (a scalar summary for the metrics), the class flag
  ``training_encoding_differs`` and ``describe`` (the model card's lines).

**Running statistics** are the architecture's state that follows training but is not trained
by the optimizer. ``training_forward`` is pure and returns this step's contribution in
``TrainStepOutput.running`` (tensors; chunked end-to-end steps combine their chunks with
``merge_running``); after the optimizer step the loop calls
``update_running_statistics(running, progress)`` once per step, where ``progress`` is a
:class:`TrainingProgress` (the step just taken, 1-based, and the run's planned total steps).
The architecture reads its own options for the rule: BatchTopK's threshold EMA starts after
``threshold_warmup_steps`` (capped at half the run) with decay ``threshold_beta``
(saes/batchtopk.py). The loop knows no rule. The state goes in **buffers** (fp32), so it is
saved, checkpointed and resumed bit for bit; Python attributes would be lost. A rule such as
"target_l0" -- an architecture adapting its own sparsity coefficient each step from the
step's L0 -- fits without touching the loop: its ``training_forward`` puts the step's L0 in
``running`` (and weights its penalty by the coefficient buffer), ``merge_running`` averages
it over chunks (token-weighted) instead of the default minimum, and
``update_running_statistics`` moves a checkpointed fp32 ``coefficient`` buffer (registered in
``init_architecture``) towards the target, using ``progress`` for any warm-up.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, NamedTuple, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from activation_cache import ConfigError

from ..architecture_options import ArchitectureOptions
from ..errors import CheckpointMismatchError, DimensionMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from ..sae_config import SAEConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
HISTORY_FILE = "history.json"


@dataclass
class TrainStepOutput:
    """What an architecture's ``training_forward`` returns for one batch of N tokens.

    The objective's loss is ``reconstruction_loss_weight * reconstruction_loss +
    sparsity_loss``; everything else is for statistics and the training state.
    """

    target_scaled: Tensor
    """[N, d_out] the target in the SAE's scaled output space (an SAE: its scaled input)."""
    output: Tensor
    """[N, d_out] the reconstruction of the target with the whole dictionary (scaled output
    space, differentiable)."""
    reconstruction_loss: Tensor
    """The reconstruction term (most architectures: MSE of ``output`` against
    ``target_scaled``, mean over tokens and dimensions; Matryoshka: the mean of its prefixes'
    MSEs)."""
    sparsity_loss: Tensor
    """The architecture's own penalties, each times its own coefficient, summed (L1, AuxK,
    L0...); a 0-d zero when it has none."""
    terms: dict[str, Tensor]
    """Each named term, unweighted and detached, for logging (``mse`` always; ``l1``, ``aux``,
    ``l0_penalty``, ``mse_prefix_<width>``...)."""
    fired: Tensor
    """bool [d_sae]: latents active on some token of the batch (dead-latent tracking)."""
    l0: Tensor
    """Mean active latents per token with the training encoding (detached 0-d)."""
    running: dict[str, Tensor] = field(default_factory=dict)
    """Running statistics this batch contributes (e.g. ``min_selected`` for a threshold EMA),
    merged over chunks with ``SAE.merge_running`` and applied by
    ``SAE.update_running_statistics`` after the optimizer step."""


class TrainingProgress(NamedTuple):
    """Where the run is, for ``SAE.update_running_statistics`` (after the optimizer step)."""

    step: int
    """The optimizer step just taken (1-based: 1 after the first step)."""
    total_steps: int
    """The run's planned number of steps (both phases of a two-phase run)."""


@dataclass
class SAEDescription:
    """What a model card says about an architecture (``SAE.describe``)."""

    architecture: str
    d_sae: int
    fields: dict[str, Any]
    """The architecture's own fields and their values."""
    inference: str
    """What the shipped (inference) encoder does, in one sentence."""

    def summary(self) -> str:
        own = ", ".join(f"{k} = {v}" for k, v in self.fields.items())
        return f"{self.architecture}, d_sae = {self.d_sae}" + (f"; {own}" if own else "")


@dataclass
class SAELensFormat:
    """An architecture's SAELens export: its SAELens architecture name, the tensors beyond
    W_enc/b_enc/W_dec/b_dec, and extra ``cfg.json`` keys and metadata."""

    architecture: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    cfg: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


class SAE(nn.Module, ABC):
    """Abstract base of every SAE architecture (see the module docstring for the seam).

    Holds what they share: scaling, data initialisation, decoder normalisation and gradient
    projection, dead-latent tracking, folding, save/load.
    """

    architecture: ClassVar[str]
    """Registered name (``SAEConfig.architecture``)."""
    Options: ClassVar[type[ArchitectureOptions]]
    """The architecture's own config fields."""
    training_encoding_differs: ClassVar[bool] = False
    """True when training encodes differently from inference (BatchTopK: over the batch), so
    evaluation also reports the training encoding's figures (``*_train``)."""
    inference_rule: ClassVar[str] = ""
    """What the shipped encoder does, in one sentence (model cards; ``describe``)."""
    saelens_reads: ClassVar[Optional[str]] = None
    """The SAELens architecture whose saved folders load into this class with the same
    encode/decode (``trainer.load_saelens``), or None; ``saelens_read_fields`` maps this
    architecture's own fields to the SAELens ``cfg.json`` keys they are read from."""
    saelens_read_fields: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: "SAEConfig", *, seed: Optional[int] = None):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ConfigError(
                f"SAEConfig.architecture: {type(self).__name__} needs {self.architecture!r}, got "
                f"{cfg.architecture!r} (use trainer.build_sae(cfg) to pick the class)"
            )
        if type(cfg.options) is not self.Options:
            raise ConfigError(
                f"SAEConfig.options: architecture {self.architecture!r} takes "
                f"{self.Options.__name__}, got {type(cfg.options).__name__}")
        self.cfg = cfg
        self.dtype = cfg.torch_dtype()
        self.device = cfg.torch_device()
        self.hook_spec = cfg.hook_spec
        self.hook_spec_out = cfg.hook_spec_out
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=self.device))
        if self.transcodes:  # the output side's own scale
            self.register_buffer("output_scale", torch.ones((), dtype=torch.float32,
                                                            device=self.device))
        self.register_buffer("ever_fired", torch.zeros(d_sae, dtype=torch.bool, device=self.device))
        self.register_buffer("num_batches_not_active",
                             torch.zeros(d_sae, dtype=torch.int64, device=self.device))
        # set by initialize_from_data; a trained SAE is continued, never re-initialised
        self.register_buffer("data_initialized", torch.zeros((), dtype=torch.bool,
                                                             device=self.device))
        self.init_architecture()
        self.initialize_weights(seed)

    def init_architecture(self) -> None:
        """Register the architecture's own parameters/buffers (called before initialisation)."""

    # -- the input and output sides (module docstring) -----------------------------------
    @property
    def transcodes(self) -> bool:
        """True for a transcoder (its options say so): separate output scale, no input
        centring; False for an SAE (one scale; b_dec centres the input)."""
        return bool(self.Options.transcodes)

    def input_bias(self) -> Optional[Tensor]:
        """What the scaled input is centred by before the encoder (an SAE: ``b_dec``; a
        transcoder: None)."""
        return None if self.transcodes else self.b_dec

    def output_scaling(self) -> Tensor:
        """The fp32 scale of the output side (an SAE: ``input_scale``; a transcoder: its
        ``output_scale`` buffer)."""
        return self.output_scale if self.transcodes else self.input_scale

    # -- construction ---------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self, seed: Optional[int] = None) -> None:
        """Random unit-norm decoder rows, zero biases; an SAE's encoder is the decoder's
        transpose, a transcoder's its own random unit-norm columns (input and output
        directions are unrelated)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)

        def unit_rows(width: int) -> Tensor:
            w = torch.empty(self.cfg.d_sae, width, dtype=torch.float32)
            bound = 1.0 / math.sqrt(width)
            w.uniform_(-bound, bound, generator=gen)
            return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

        w = unit_rows(self.cfg.d_out)
        self.W_dec.copy_(w.to(self.W_dec))
        self.W_enc.copy_((unit_rows(self.cfg.d_in) if self.transcodes else w).t().to(self.W_enc))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor, target: Optional[Tensor] = None, *,
                             b_dec_init: str = "geometric_median",
                             scale_inputs: bool = True) -> None:
        """Set ``input_scale`` (E||x|| = sqrt(d_in)), a transcoder's ``output_scale``
        (E||y|| = sqrt(d_out)) and ``b_dec`` (the output bias) from raw tokens ``x`` and their
        ``target`` rows (None: ``x``, an SAE).

        ``b_dec_init``: ``geometric_median`` (Weiszfeld iterations), ``mean`` or ``zeros`` of
        the scaled targets. An SAE's encoder sees its input centred by ``b_dec``; a transcoder,
        which does not centre its input, starts with ``b_enc = -c @ W_enc`` for ``c`` the same
        centre of its scaled inputs: the same pre-activations at the start, kept in a bias
        SAELens's transcoders have.
        """
        raw = x
        x = self.check_input(x).reshape(-1, self.cfg.d_in).double()
        if x.shape[0] == 0:
            raise ValueError("initialize_from_data needs at least one token")
        y = x if target is None or target is raw else (
            self.check_target(target).reshape(-1, self.cfg.d_out).double())
        if self.transcodes and y is x and self.cfg.d_out != self.cfg.d_in:
            raise DimensionMismatchError("a transcoder's initialisation needs its target rows")
        if scale_inputs:
            mean_norm = float(x.norm(dim=1).mean())
            scale = math.sqrt(self.cfg.d_in) / mean_norm if mean_norm > 0 else 1.0
            self.input_scale.fill_(scale)
            if self.transcodes:
                mean_norm = float(y.norm(dim=1).mean())
                scale = math.sqrt(self.cfg.d_out) / mean_norm if mean_norm > 0 else 1.0
                self.output_scale.fill_(scale)
        def centre(rows: Tensor) -> Tensor:
            if b_dec_init == "geometric_median":
                return geometric_median(rows)
            if b_dec_init == "mean":
                return rows.mean(0)
            if b_dec_init == "zeros":
                return torch.zeros_like(rows[0])
            raise ValueError(f"unknown b_dec_init {b_dec_init!r}")

        self.b_dec.copy_(centre(y * float(self.output_scaling())).to(self.b_dec))
        if self.input_bias() is None:  # no input centring: the encoder bias takes it
            c_in = centre(x * float(self.input_scale))
            self.b_enc.copy_((-(c_in @ self.W_enc.double())).to(self.b_enc))
        self.data_initialized.fill_(True)

    # -- input handling -------------------------------------------------------------------
    def check_input(self, x: Tensor) -> Tensor:
        if x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            got = "a scalar" if x.ndim == 0 else f"width {x.shape[-1]}"
            raise DimensionMismatchError(
                f"activations have {got} (shape {tuple(x.shape)}) but the SAE has "
                f"d_in={self.cfg.d_in} (hook {self.hook_spec})"
            )
        return x

    def check_target(self, y: Tensor) -> Tensor:
        if y.ndim == 0 or y.shape[-1] != self.cfg.d_out:
            got = "a scalar" if y.ndim == 0 else f"width {y.shape[-1]}"
            raise DimensionMismatchError(
                f"target activations have {got} (shape {tuple(y.shape)}) but the SAE has "
                f"d_out={self.cfg.d_out} (hook {self.hook_spec_out})"
            )
        return y

    def scale_input(self, x: Tensor) -> Tensor:
        """Raw activations -> the SAE's internal (scaled) space, in the parameter dtype."""
        x = self.check_input(x).to(device=self.W_enc.device)
        work = torch.promote_types(self.dtype, torch.float32)  # scale in fp32 (or fp64)
        return (x.to(work) * self.input_scale.to(work)).to(self.dtype)

    def scale_target(self, y: Tensor) -> Tensor:
        """Raw target activations -> the scaled output space, in the parameter dtype."""
        y = self.check_target(y).to(device=self.W_enc.device)
        work = torch.promote_types(self.dtype, torch.float32)
        return (y.to(work) * self.output_scaling().to(work)).to(self.dtype)

    def unscale_output(self, y_scaled: Tensor) -> Tensor:
        """Scaled outputs -> raw target units (fp32 or wider)."""
        work = torch.promote_types(y_scaled.dtype, torch.float32)
        return y_scaled.to(work) / self.output_scaling().to(work)

    def scaled_pair(self, x: Tensor, target: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(x_scaled [N, d_in], target_scaled [N, d_out])`` of a batch (any leading
        dimensions, flattened to tokens). ``target`` None or ``x`` itself (an SAE's batch):
        one scaled tensor serves both."""
        xs = self.scale_input(x).reshape(-1, self.cfg.d_in)
        if target is None or target is x:
            if self.transcodes and self.cfg.d_out != self.cfg.d_in:
                raise DimensionMismatchError(
                    f"a transcoder needs its target rows ({self.hook_spec_out}), got none")
            return xs, (xs if not self.transcodes else self.scale_target(x).reshape(
                -1, self.cfg.d_out))
        return xs, self.scale_target(target).reshape(-1, self.cfg.d_out)

    def pre_activations(self, x_scaled: Tensor) -> Tensor:
        b_in = self.input_bias()
        if b_in is None:
            return x_scaled @ self.W_enc + self.b_enc
        return (x_scaled - b_in) @ self.W_enc + self.b_enc

    def skip_scaled(self, x_scaled: Tensor) -> Optional[Tensor]:
        """A linear path from the scaled input to the scaled output, added to the dictionary's
        reconstruction (a skip transcoder's ``x_s @ W_skip.T``); None: none."""
        return None

    # -- inference API (raw activations in and out): what export ships ---------------------
    @abstractmethod
    def encode_scaled(self, x_scaled: Tensor) -> Tensor:
        """Inference encoding of scaled inputs [..., d_in] -> latents [..., d_sae] (per token:
        a token's code never depends on the other tokens it is encoded with)."""

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] -> latent activations [..., d_sae] (inference encoding)."""
        return self.encode_scaled(self.scale_input(x))

    def decode(self, features: Tensor) -> Tensor:
        """Latent activations [..., d_sae] -> the dictionary's reconstruction of the target in
        raw units [..., d_out] (a skip transcoder's linear path needs the input: ``forward``)."""
        out = features.to(self.dtype) @ self.W_dec + self.b_dec
        return self.unscale_output(out).to(self.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(reconstruction of the target, features)`` for raw input activations ``x`` (any
        leading dimensions): what the SAE's output hook receives when it is spliced in."""
        xs = self.scale_input(x)
        features = self.encode_scaled(xs)
        out = features.to(self.dtype) @ self.W_dec + self.b_dec
        skip = self.skip_scaled(xs)
        if skip is not None:
            out = out + skip
        return self.unscale_output(out).to(self.dtype), features

    # -- training (the architecture's part of the seam) ---------------------------------------
    @abstractmethod
    def training_forward(self, x: Tensor, target: Optional[Tensor] = None) -> TrainStepOutput:
        """The training encoding and loss terms of one batch of raw input activations and
        their raw targets (any leading dimensions, flattened to tokens; ``target`` None or
        ``x`` itself: an SAE's batch). Pure: reads the dead mask, changes no state."""

    @abstractmethod
    def saelens_format(self, folded: "SAE") -> SAELensFormat:
        """How ``folded`` (a copy of this SAE with the input scaling folded in) exports to
        SAELens (see trainer/saelens_export.py)."""

    def merge_running(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
        """Combine the running statistics of two chunks of one step (default: elementwise
        minimum of each statistic, which is what a threshold statistic needs)."""
        out = dict(a)
        for key, value in b.items():
            out[key] = value if key not in out else torch.minimum(out[key], value)
        return out

    @torch.no_grad()
    def update_running_statistics(self, running: dict[str, Tensor],
                                  progress: TrainingProgress) -> None:
        """Apply one step's running statistics (after the optimizer step), by the
        architecture's own rule and options (module docstring). Default: nothing to track."""

    @property
    def needs_calibration(self) -> bool:
        """True when the loop must :meth:`calibrate` what it evaluates and ships (read from the
        architecture's options; default: never)."""
        return False

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor], max_tokens: Optional[int] = None
                  ) -> Optional[str]:
        """Fit the inference encoding's thresholds on raw input batches (up to ``max_tokens``;
        None: the architecture's own option); returns a one-line description, or None when
        there is nothing to calibrate / no data."""
        return None

    @classmethod
    def describe(cls, cfg: "SAEConfig") -> SAEDescription:
        """What a model card says about an SAE of config ``cfg``: its own fields (as the config
        holds them, derived ones included) and its inference rule."""
        own = {name: getattr(cfg.options, name) for name in cfg.options.field_names()}
        return SAEDescription(cls.architecture, cfg.d_sae, own, cls.inference_rule)

    def inference_threshold(self) -> Optional[float]:
        """A scalar summary of the inference threshold(s) for the metrics (None: none)."""
        return None

    def sparsity_coefficients(self) -> dict[str, float]:
        """The architecture's loss coefficients by name (for model cards and reports)."""
        return {}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def project_decoder_gradients(self) -> None:
        """Remove from each decoder row's gradient its component along the row, so the
        optimizer only rotates rows (assumes unit-norm rows, as training keeps them)."""
        if self.W_dec.grad is None:
            return
        w, grad = self.W_dec, self.W_dec.grad
        parallel = torch.linalg.vecdot(grad, w).unsqueeze(1)
        grad.addcmul_(parallel, w, value=-1.0)

    @torch.no_grad()
    def update_inactive_features(self, fired: Tensor) -> None:
        """Record which latents fired in this batch.

        ``fired``: bool [d_sae] (or latent activations [..., d_sae], firing where > 0).
        """
        if fired.dtype != torch.bool:
            fired = (fired.reshape(-1, self.cfg.d_sae) > 0).any(0)
        self.ever_fired |= fired
        self.num_batches_not_active += 1
        self.num_batches_not_active.masked_fill_(fired, 0)

    @torch.no_grad()
    def update_training_state(self, fired: Tensor, running: Optional[dict[str, Tensor]],
                              progress: TrainingProgress) -> None:
        """Everything the SAE tracks after an optimizer step: dead latents, then the
        architecture's running statistics (``TrainStepOutput.running``) by its own rule."""
        self.update_inactive_features(fired)
        self.update_running_statistics(running or {}, progress)

    def dead_mask(self) -> Tensor:
        """Latents idle for ``n_batches_to_dead`` consecutive training batches."""
        return self.num_batches_not_active >= self.cfg.n_batches_to_dead

    def count_dead_features(self) -> int:
        """Latents that have never fired during training."""
        return int((~self.ever_fired).sum())

    def dead_feature_percentage(self) -> float:
        return 100.0 * self.count_dead_features() / self.cfg.d_sae

    # -- folding ------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_scaling(self) -> None:
        """Fold the input and output scales into the weights (raw-input outputs unchanged;
        the scales become 1): W_enc * s_in, W_dec / s_out, b_dec / s_out (an SAE's b_dec also
        centres the input: s_in = s_out there, so the encoder sees the same pre-activations),
        and the architecture's own parameters in :meth:`fold_architecture`."""
        s_in, s_out = float(self.input_scale), float(self.output_scaling())
        if s_in == 1.0 and s_out == 1.0:
            return
        self.W_enc.mul_(s_in)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)
        self.fold_architecture(s_in, s_out)
        self.input_scale.fill_(1.0)
        if self.transcodes:
            self.output_scale.fill_(1.0)

    @torch.no_grad()
    def fold_architecture(self, input_scale: float, output_scale: float) -> None:
        """Fold the scales into the architecture's own parameters (e.g. a skip transcoder's
        ``W_skip * s_in / s_out``); default: nothing of its own depends on them."""

    def clone(self) -> "SAE":
        """An independent copy (same class, config, parameters and buffers)."""
        other = type(self)(self.cfg, seed=0)
        other.load_state_dict(self.state_dict())
        other.train(self.training)
        return other

    def folded_copy(self) -> "SAE":
        """A copy with the input scaling folded in (for saving/export); ``self`` is unchanged."""
        other = self.clone()
        other.fold_scaling()
        return other

    # -- save / load -------------------------------------------------------------------------
    def save(self, path: str | Path, history: Optional[list[dict[str, Any]]] = None, *,
             fold: bool = True) -> Path:
        """Write ``config.json``, ``weights.safetensors`` and ``history.json`` into ``path``.

        ``fold=True`` (default) folds the input scaling into the weights first, so the saved SAE
        takes raw activations with ``input_scale == 1``; checkpoints use ``fold=False``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.folded_copy() if fold else self
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2))
        (path / HISTORY_FILE).write_text(json.dumps(history or [], indent=1))
        return path

    @torch.no_grad()
    def load_weights(self, file: str | Path) -> None:
        """Load ``weights.safetensors`` into this SAE, checking names and shapes."""
        file = Path(file)
        if not file.exists():
            raise CheckpointMismatchError(f"{file} does not exist")
        try:
            tensors = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error type for damaged files
            raise CheckpointMismatchError(
                f"{file}: not a readable safetensors file ({exc})") from None
        own = self.state_dict()
        if "data_initialized" not in tensors:  # saved before the marker existed: trained
            tensors["data_initialized"] = torch.ones((), dtype=torch.bool)
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise CheckpointMismatchError(
                f"{file}: tensors do not match a {type(self).__name__} "
                f"(missing: {missing or 'none'}; unexpected: {extra or 'none'})"
            )
        for name, mine in own.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(mine.shape):
                raise CheckpointMismatchError(
                    f"{file}: {name} has shape {list(value.shape)} but the config "
                    f"(d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, d_out={self.cfg.d_out}) "
                    f"needs {list(mine.shape)}"
                )
        self.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in tensors.items()})


def geometric_median(x: Tensor, iterations: int = 20, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to rows of x."""
    y = x.mean(0)
    for _ in range(iterations):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if torch.allclose(y_new, y, rtol=0, atol=1e-10 * (1 + float(y.abs().max()))):
            return y_new
        y = y_new
    return y
