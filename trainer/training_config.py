"""TrainingConfig: how one SAE is trained (optimizer, schedule, budget, checkpoints, losses).

Every field of the user's design notes (``train_config.py``) is here under its name, plus what a
research-grade trainer needs. Two notes on names kept from the design notes:

* ``batch_size`` counts *sequences* (windows of ``max_text_length`` tokens) and is used where
  whole sequences are needed (end-to-end training). The local-MSE loop trains on shuffled token
  rows, ``train_batch_tokens`` per step.
* ``use_end_to_end`` defaults to False here (the notes had True): end-to-end training needs the
  model and sequence-ordered data, so it is opt-in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from activation_cache import ConfigError, StrictConfig

from .evaluators import check_evaluator_names, objective_metric_names

B_DEC_INITS = ("geometric_median", "mean", "zeros")
OUTLIER_POLICIES = ("drop", "clip", "none")
LOGIT_KL_SCALES = ("fixed", "mse", "balanced")
FINETUNE_SCHEDULES = ("phase", "linear")
# fields that may change between a checkpoint and its resumption without changing the math
RESUME_SAFE_FIELDS = frozenset({
    "log_freq", "checkpoint_every", "keep_checkpoints", "save_best", "eval_max_tokens",
    "show_progress", "evaluators",
})
# fields that earlier versions accepted, and what to use instead (a YAML naming one is refused;
# a field that moved to an architecture's options is found in the registry: moved_to_sae)
REMOVED_FIELDS = {
    "num_dataloader_workers": "it was never read; the cache reader needs no worker processes",
    "persistent_workers": "it was never read; the cache reader needs no worker processes",
    "pin_memory": "it was never read; remove it",
    "max_text_length": ("it was never read: windows are tokenized when the cache is built "
                        "(set max_text_length in the cache config)"),
}


@dataclass
class TrainingConfig(StrictConfig):
    """Hyperparameters of one training run (see the module docstring)."""

    # -- budget ------------------------------------------------------------------------------
    num_epochs: int = 10
    """Passes over the training source; training stops at ``num_epochs`` or ``max_tokens``,
    whichever comes first."""
    max_tokens: Optional[int] = None
    """Total training-token budget (None: ``num_epochs`` decides)."""
    batch_size: int = 32
    """Sequences per batch, for sequence-level (end-to-end) training; see the module docstring."""
    train_batch_tokens: int = 4096
    """Tokens per optimizer step for token-level (local MSE) training."""
    # -- optimizer and schedule ----------------------------------------------------------------
    lr: Optional[float] = 5e-3
    """Adam learning rate. The default is the best of a measured grid (1e-3 .. 1e-2) on real
    SmolLM2 layer-6 activations at both a 100-step and a 1,000-step budget (BatchTopK, d_sae
    2304, k 32, batch 2048; bench/quality.py, bench/RESULTS.md); 1e-3 was 40 % (100 steps) and
    14 % (1,000 steps) worse in held-out FVU. None: the common auto rule
    2e-4 / sqrt(d_sae / 2**14) (for much longer runs and wider SAEs)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    lr_warmup_steps: Optional[int] = None
    """Linear warm-up from 0 to ``lr`` over this many steps (capped at a tenth of the run);
    None: ``lr_warmup_fraction`` of the run's steps."""
    lr_warmup_fraction: float = 0.01
    """Warm-up as a fraction of the run's steps (when ``lr_warmup_steps`` is None), so the
    default fits a 100-step trial and a 100k-step run alike."""
    lr_decay_fraction: float = 0.2
    """Linear decay to 0 over this final fraction of the steps (0: constant after warm-up)."""
    autocast: Optional[str] = None
    """``bf16``: run each step's forward under bfloat16 autocast (the dense encoder GEMM in bf16;
    parameters, Adam's state, thresholds and running statistics stay fp32). Meant for GPUs: on
    a CPU bf16 matmuls are ~100x slower than fp32. None: full precision."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    seed: int = 0
    """Seeds data order (with the epoch) and, in ``train_from_yaml``, the SAE's initial weights."""
    # -- losses --------------------------------------------------------------------------------
    reconstruction_loss_weight: float = 1.0
    """Weight of the hooked layer's reconstruction MSE (mean over tokens and dimensions, on
    inputs scaled to E||x|| = sqrt(d_in))."""
    use_end_to_end: bool = False
    """Train through the model (KL on logits and/or downstream block MSE); needs
    ``use_logit_kl`` or ``use_block_mse``, sequence-ordered data and EndToEndObjective."""
    use_block_mse: bool = False
    """End-to-end: add the MSE of downstream blocks' activations (spliced vs clean)."""
    block_mse_weight: float = 0.1
    """Weight of each downstream block-MSE term."""
    block_mse_layers: Optional[tuple[int, ...]] = None
    """Downstream layers for block MSE (None: every layer after the hooked one)."""
    use_logit_kl: bool = True
    """End-to-end: add KL(clean || spliced) of the next-token distributions."""
    logit_kl_weight: float = 0.1
    """Weight of the KL term."""
    logit_kl_temperature: float = 1.0
    """Temperature T of the KL training term: both distributions' logits are divided by T
    (evaluation's ``kl_div`` is always at T = 1)."""
    logit_kl_clean: str = "cached"
    """Where the KL training term's clean distribution comes from: ``cached`` (the cache's
    compact logits: the top-k log-probs and one tail bucket, a lower bound of the KL) or
    ``live`` (a clean pass from the splice point per batch: the exact KL over the whole
    vocabulary, for one more forward without grad). Evaluation always uses what the cache has."""
    logit_kl_scale: str = "fixed"
    """How ``logit_kl_weight`` is read: ``fixed`` (the KL term is weight x KL); ``mse`` (the
    weight is relative to the reconstruction MSE when the end-to-end phase starts: the term is
    weight x (MSE_0 / KL_0) x KL, with both measured on its first batch, so weight 1 makes KL
    count as much as the MSE there and a weight carries over between models and layers); or
    ``balanced`` (Karvonen 2025's per-step balance: on every step alpha = (R / KL).detach()
    from that whole step's reconstruction term R and KL, and the loss is 0.5 x (the SAE's own
    terms + weight x alpha x KL + block-MSE); see trainer/end_to_end.py)."""
    # -- two-phase schedule (local, then an end-to-end fine-tune) --------------------------------
    finetune_fraction: float = 0.0
    """With ``use_end_to_end``: the last fraction of the token budget (``max_tokens``) is an
    end-to-end fine-tune, the rest trains locally on cached activations (Karvonen 2025: a short
    KL fine-tune closes much of the CE gap of full end-to-end training). 0: one phase
    (end-to-end throughout). Each phase has its own warm-up and decay; Adam's moments, the dead
    counters and the threshold EMA carry over (trainer/finetune.py)."""
    finetune_lr: Optional[float] = None
    """Peak learning rate of the fine-tune phase (None: ``lr`` / 10). The published recipe
    fine-tunes at 5e-5 (Adam, clipped at ``max_grad_norm`` 1.0)."""
    finetune_batch_sequences: Optional[int] = None
    """Windows (sequences of the cache's ``max_text_length`` tokens) per optimizer step of the
    fine-tune phase (None: ``batch_size``). The published recipe uses 2-8 sequences per step,
    so that a fine-tune of a few percent of the tokens is still thousands of steps."""
    finetune_schedule: str = "phase"
    """Learning-rate schedule of the fine-tune phase: ``phase`` (like the local phase: warm-up,
    constant, linear decay over the last ``lr_decay_fraction``) or ``linear`` (the published
    recipe: no warm-up, linear decay from ``finetune_lr`` to 0 over the whole fine-tune)."""
    init_from: Optional[str] = None
    """Start from the SAE saved in this folder (``final/``, ``best/``, a checkpoint, a native
    export) instead of a fresh one: its weights, input scale, threshold and dead counters are
    kept (fine-tune a sweep's winner). Its architecture and shape must match the job's."""
    # -- data ------------------------------------------------------------------------------------
    activation_batch_size: int = 16
    """End-to-end training only: the SAE's training forward runs over the batch's train-mask
    tokens in chunks of this many sequences, and each chunk is one training-encoding batch
    (for BatchTopK the k x n_tokens budget is shared within a chunk, not across the batch).
    The live model pass is chunked separately (by logits memory)."""
    outlier_policy: str = "drop"
    """What to do with training tokens whose norm exceeds ``outlier_norm_multiple`` x the median
    token norm (measured on the initialisation tokens): ``drop`` them (default), ``clip`` their
    norm to the cap, or ``none``. BOS/attention-sink tokens have norms 10-100x the median and
    otherwise eat BatchTopK's shared k x batch budget and dominate the MSE."""
    outlier_norm_multiple: float = 10.0
    """Outlier cap as a multiple of the median token norm. 10 catches BOS / attention sinks but
    keeps ordinary high-norm tokens: in SmolLM2-135M layer 6 (BOS excluded) ~1 % of tokens sit
    above 3x the median and carry ~43 % of the variance; dropping them (3x) cost 0.19 of
    all-token explained variance and gained only 0.006 on the other tokens."""
    # -- initialisation from data ----------------------------------------------------------------
    b_dec_init: str = "geometric_median"
    """Initial decoder bias: ``geometric_median`` (Weiszfeld), ``mean`` or ``zeros`` of the
    initialisation tokens. A data-initialised b_dec decides short runs."""
    scale_inputs: bool = True
    """Scale inputs by a constant so that E||x|| = sqrt(d_in) (estimated on the initialisation
    tokens, kept in fp32, folded into the weights at save/export)."""
    init_tokens: int = 16384
    """Tokens (from the start of epoch 0) used to estimate b_dec, the input scale and the
    outlier cap."""
    # -- logging, validation, checkpoints ----------------------------------------------------------
    log_freq: int = 100
    """Evaluate on the validation source (and report a MetricsRecord) every this many steps."""
    eval_max_tokens: Optional[int] = 65536
    """Validation tokens per evaluation (None: the whole validation source)."""
    checkpoint_every: Optional[int] = 1000
    """Write a resumable checkpoint every this many steps (and at the end) when an output folder
    is given; None: only at the end. Checkpoint steps also evaluate."""
    keep_checkpoints: int = 2
    """How many of the most recent checkpoints to keep."""
    save_best: bool = True
    """Keep a copy of the SAE with the best ``best_metric`` under ``OUT/best``."""
    best_metric: str = "explained_variance"
    """MetricsRecord field deciding 'best'."""
    best_mode: str = "max"
    """``max`` or ``min``: which direction of ``best_metric`` is better."""
    show_progress: bool = True
    """Show the console progress bar (the default reporter)."""
    evaluators: Optional[tuple[str, ...]] = None
    """Evaluators to run besides those every job runs (``reconstruction``; ``end_to_end`` with
    ``use_end_to_end``), e.g. ``[ground_truth]`` (trainer/evaluators/: each adds its figures to
    every validation record and to the reported test figures). An evaluator whose data the cache
    lacks is refused before training."""

    def validate(self) -> None:
        positive_ints = ("num_epochs", "batch_size", "train_batch_tokens", "log_freq",
                         "activation_batch_size", "init_tokens", "keep_checkpoints")
        for name in positive_ints:
            value = getattr(self, name)
            self._require(_is_int(value) and value >= 1, name,
                          f"must be an integer >= 1, got {value!r}")
        for name in ("max_tokens", "checkpoint_every", "eval_max_tokens"):
            value = getattr(self, name)
            if value is not None:
                self._require(_is_int(value) and value >= 1, name,
                              f"must be an integer >= 1 or null, got {value!r}")
        self._require(_is_int(self.seed) and self.seed >= 0, "seed",
                      f"must be an integer >= 0, got {self.seed!r}")
        if self.lr_warmup_steps is not None:
            self._require(_is_int(self.lr_warmup_steps) and self.lr_warmup_steps >= 0,
                          "lr_warmup_steps",
                          f"must be an integer >= 0 or null, got {self.lr_warmup_steps!r}")
        self._require(0 <= self.lr_warmup_fraction <= 0.5, "lr_warmup_fraction",
                      f"must be in [0, 0.5], got {self.lr_warmup_fraction}")
        for name in ("lr", "finetune_lr"):
            value = getattr(self, name)
            if value is not None:
                self._require(isinstance(value, (int, float)) and math.isfinite(value)
                              and value > 0, name, f"must be > 0, got {value!r}")
        self._require(self.autocast in (None, "bf16"), "autocast",
                      f"must be null or 'bf16', got {self.autocast!r}")
        self._require(self.logit_kl_clean in ("cached", "live"), "logit_kl_clean",
                      f"must be 'cached' or 'live', got {self.logit_kl_clean!r}")
        self._require(self.logit_kl_scale in LOGIT_KL_SCALES, "logit_kl_scale",
                      f"must be one of {', '.join(LOGIT_KL_SCALES)}, got "
                      f"{self.logit_kl_scale!r}")
        self._require(self.finetune_schedule in FINETUNE_SCHEDULES, "finetune_schedule",
                      f"must be one of {', '.join(FINETUNE_SCHEDULES)}, got "
                      f"{self.finetune_schedule!r}")
        if self.finetune_batch_sequences is not None:
            self._require(_is_int(self.finetune_batch_sequences)
                          and self.finetune_batch_sequences >= 1, "finetune_batch_sequences",
                          f"must be an integer >= 1 or null, got "
                          f"{self.finetune_batch_sequences!r}")
        if self.finetune_fraction == 0:
            for name, default in (("finetune_lr", None), ("finetune_batch_sequences", None),
                                  ("finetune_schedule", "phase")):
                self._require(getattr(self, name) == default, name,
                              "only applies to a fine-tune phase, and finetune_fraction is 0 "
                              "(set finetune_fraction, e.g. 0.05, or remove this field)")
        self._require(isinstance(self.finetune_fraction, (int, float))
                      and 0 <= self.finetune_fraction < 1, "finetune_fraction",
                      f"must be in [0, 1), got {self.finetune_fraction!r}")
        if self.finetune_fraction > 0:
            self._require(self.use_end_to_end, "finetune_fraction",
                          "is a fraction of an end-to-end fine-tune: set use_end_to_end: true")
            self._require(self.max_tokens is not None, "finetune_fraction",
                          "needs a token budget to split (max_tokens; a sweep sets it from "
                          "tokens_per_trial)")
        if self.init_from is not None:
            self._require(isinstance(self.init_from, str) and bool(self.init_from), "init_from",
                          f"must be a folder path, got {self.init_from!r}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            self._require(0 <= value < 1, name, f"must be in [0, 1), got {value}")
        self._require(self.adam_eps > 0, "adam_eps", f"must be > 0, got {self.adam_eps}")
        self._require(0 <= self.lr_decay_fraction <= 1, "lr_decay_fraction",
                      f"must be in [0, 1], got {self.lr_decay_fraction}")
        if self.max_grad_norm is not None:
            self._require(self.max_grad_norm > 0, "max_grad_norm",
                          f"must be > 0 or null, got {self.max_grad_norm}")
        for name in ("reconstruction_loss_weight", "block_mse_weight", "logit_kl_weight"):
            value = getattr(self, name)
            self._require(math.isfinite(value) and value >= 0, name, f"must be >= 0, got {value}")
        self._require(math.isfinite(self.logit_kl_temperature) and self.logit_kl_temperature > 0,
                      "logit_kl_temperature", f"must be > 0, got {self.logit_kl_temperature}")
        if self.use_end_to_end:
            self._require(self.use_logit_kl or self.use_block_mse, "use_end_to_end",
                          "needs use_logit_kl or use_block_mse (otherwise there is no "
                          "end-to-end term); set one of them true or use_end_to_end false")
        if self.block_mse_layers is not None:
            self._require(self.use_block_mse, "block_mse_layers",
                          "is set but use_block_mse is false")
            self._require(all(isinstance(i, int) and i >= 0 for i in self.block_mse_layers)
                          and len(self.block_mse_layers) > 0, "block_mse_layers",
                          "must be a non-empty list of layer indices, "
                          f"got {self.block_mse_layers!r}")
        self._require(self.outlier_policy in OUTLIER_POLICIES, "outlier_policy",
                      f"must be one of {', '.join(OUTLIER_POLICIES)}, got {self.outlier_policy!r}")
        self._require(self.outlier_norm_multiple > 1, "outlier_norm_multiple",
                      "must be > 1 (a multiple of the median norm), "
                      f"got {self.outlier_norm_multiple}")
        self._require(self.b_dec_init in B_DEC_INITS, "b_dec_init",
                      f"must be one of {', '.join(B_DEC_INITS)}, got {self.b_dec_init!r}")
        if self.evaluators is not None:
            self._require(isinstance(self.evaluators, (list, tuple)), "evaluators",
                          f"must be a list of evaluator names, got {self.evaluators!r}")
            check_evaluator_names(self.evaluators)
        names = objective_metric_names()
        self._require(self.best_metric in names, "best_metric",
                      f"must be a numeric MetricsRecord field ({', '.join(names)}), "
                      f"got {self.best_metric!r}")
        self._require(self.best_mode in ("max", "min"), "best_mode",
                      f"must be 'max' or 'min', got {self.best_mode!r}")

    @classmethod
    def from_dict(cls, data: Any) -> "TrainingConfig":
        if isinstance(data, Mapping):
            for name, why in REMOVED_FIELDS.items():
                if name in data:
                    raise ConfigError(f"TrainingConfig.{name}: no longer a field ({why})")
            for name in data:
                moved = moved_to_sae(name)
                if moved:
                    raise ConfigError(f"TrainingConfig.{name}: {moved}")
        return super().from_dict(data)  # type: ignore[return-value]

    def warmup_steps(self, total_steps: int) -> int:
        """Warm-up steps of a phase of ``total_steps`` steps."""
        if self.lr_warmup_steps is not None:
            return min(self.lr_warmup_steps, total_steps // 10)
        return int(round(self.lr_warmup_fraction * total_steps))

    def resolved_finetune_lr(self, base_lr: float) -> float:
        """``finetune_lr``, or a tenth of the local phase's peak lr ``base_lr``."""
        return self.finetune_lr if self.finetune_lr is not None else base_lr / 10.0

    def resolved_lr(self, d_sae: int) -> float:
        """``lr``, or the auto rule 2e-4 / sqrt(d_sae / 2**14) when it is None."""
        if self.lr is not None:
            return self.lr
        return 2e-4 / math.sqrt(d_sae / 2**14)


def moved_to_sae(name: str) -> Optional[str]:
    """Where ``name`` lives when it is not a training field but an architecture's own field
    (e.g. the threshold warm-up, EMA rate and calibration, which moved from ``training:`` to
    the options of the architectures with a threshold); None otherwise."""
    from .registry import architectures_with_field

    if name in {f.name for f in dataclasses.fields(TrainingConfig)}:
        return None
    owners = architectures_with_field(name)
    if not owners:
        return None
    return (f"not a training field: it belongs to the SAE config of architecture(s) "
            f"{', '.join(owners)}; move it to the `sae:` block (sae.{name})")


def _is_int(value: object) -> bool:
    """An integer that is not a bool (YAML's ``true`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
