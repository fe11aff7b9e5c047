"""The training loop: ``train_sae`` and its result, ``TrainResult``.

Per step: check the batch (via the objective), set the scheduled learning rate, forward/backward
through the objective, project the decoder gradients, clip the gradient norm, Adam step,
renormalise the decoder rows, update dead-latent counters and the architecture's running
statistics (``sae.update_training_state(fired, running, TrainingProgress(step, total))``: the
architecture applies its own rule, e.g. a threshold EMA after its own warm-up). Every
``log_freq`` steps (and at every checkpoint) it evaluates **the model it would ship** on the
validation source and reports a MetricsRecord: for an SAE that ``needs_calibration`` (a
property the architecture reads from its own options) that is a copy calibrated on
calibration tokens (``Objective.calibration_batches``: training tokens in their own order,
never the validation or test tokens), and ``OUT/best`` saves that calibrated copy.
Every ``checkpoint_every`` steps it writes a resumable checkpoint. At the end it calibrates the
SAE itself on the same tokens, evaluates, writes the final checkpoint and saves the SAE
(folded) to ``OUT/final``.

Output folder layout (when ``out_dir`` is given)::

    OUT/checkpoints/step_00001000/   resumable checkpoints (the last ``keep_checkpoints``)
    OUT/best/                        the SAE with the best ``best_metric`` (``save_best``)
    OUT/final/                       the SAE after training (config.json, weights, history.json)

Resuming (``resume_from``) restores weights, Adam moments, step/epoch/batch position, tokens,
dead counters, threshold, RNG and history, and continues bit-for-bit as if never stopped.
Ctrl-C finishes the current step, writes a checkpoint and re-raises KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import (CHECKPOINTS_DIR, TrainerState, checkpoint_name, list_checkpoints,
                         load_checkpoint, save_checkpoint)
from .evaluators import EvaluationSuite, apply_figures
from .errors import DimensionMismatchError, NonFiniteActivationError, TrainingDivergedError
from .metrics import MetricsRecord
from .objective import LocalObjective, Objective
from .output_folder import atomic_directory, remove_output
from .reporting import ConsoleReporter, Reporter
from .schedule import Schedule
from .saes.base import SAE, TrainingProgress
from .timing import timed_phase
from .training_config import TrainingConfig


@dataclass
class TrainResult:
    """What ``train_sae`` returns."""

    sae: SAE
    """The trained SAE, in eval mode (inference encoding); unfolded: raw activations go
    through its ``input_scale`` (``sae.save`` folds it)."""
    history: list[MetricsRecord]
    final: Optional[MetricsRecord]
    steps: int
    tokens_seen: int
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    out_dir: Optional[Path] = None
    final_dir: Optional[Path] = None
    best_dir: Optional[Path] = None
    last_checkpoint: Optional[Path] = None
    extra: dict[str, Any] = field(default_factory=dict)


class _DeferredInterrupt:
    """Turn the first Ctrl-C into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Window:
    """Running sums of the step statistics between two reports (tensors until reported)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss: Any = 0.0
        self.steps = 0
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, stats: dict[str, Any], tokens: int) -> None:
        self.loss = self.loss + loss.detach()
        self.steps += 1
        self.tokens += tokens
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> tuple[Optional[float], dict[str, float]]:
        if self.steps == 0:
            return None, {}
        terms = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        return float(self.loss) / self.steps, terms

    def state_dict(self) -> dict[str, Any]:
        """The window as JSON (saved in checkpoints); {} when empty."""
        if self.steps == 0:
            return {}
        return {"loss": float(self.loss), "steps": self.steps, "tokens": self.tokens,
                "sums": {k: float(v) for k, v in self.sums.items()}, "counts": dict(self.counts),
                "seconds": time.perf_counter() - self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a window saved mid-way (the sums are fp32 values: continuing from them
        gives the same means as an uninterrupted window)."""
        if not state:
            return
        self.loss, self.steps, self.tokens = state["loss"], state["steps"], state["tokens"]
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
        self.started = time.perf_counter() - float(state.get("seconds", 0.0))


def train_sae(sae: SAE, train_source: Any, config: TrainingConfig, *, val_source: Any = None,
              out_dir: str | Path | None = None, resume_from: str | Path | None = None,
              reporter: Optional[Reporter] = None,
              objective: Optional[Objective] = None,
              evaluators: Optional[EvaluationSuite] = None) -> TrainResult:
    """Train ``sae`` on ``train_source`` (an ActivationSource, or what ``objective`` consumes).

    See the module docstring for what happens per step, the output layout and resuming.
    ``evaluators``: the job's evaluation suite (trainer/evaluators/; ``job_sources`` builds it);
    None: the suite ``config.evaluators`` names, prepared on the training source's cache
    (``train_source.reader``, if any) -- before the first step.
    """
    reporter = reporter if reporter is not None else ConsoleReporter(
        show_progress=config.show_progress)
    objective = objective if objective is not None else LocalObjective(config)
    if evaluators is None:
        evaluators = EvaluationSuite.build(config, reader=getattr(train_source, "reader", None),
                                           hook=sae.cfg.hook_spec,
                                           target_hook=sae.cfg.hook_spec_out,
                                           objective=objective)
    for which, source in (("training", train_source), ("validation", val_source)):
        for side, hook in (("d_in", sae.hook_spec), ("d_out", sae.hook_spec_out)):
            width = getattr(source, side, None)
            if width is not None and width != getattr(sae.cfg, side):
                raise DimensionMismatchError(
                    f"the {which} activations have {side}={width} but the SAE has "
                    f"{side}={getattr(sae.cfg, side)} (SAEConfig.{side}; hook {hook})")
    out = Path(out_dir) if out_dir is not None else None

    planned = objective.planned_steps(train_source)
    if planned is not None:  # the objective plans its own steps (e.g. two phases)
        total_steps = planned
    else:
        total_steps = objective.steps_per_epoch(train_source) * config.num_epochs
        if config.max_tokens is not None:
            total_steps = min(total_steps, math.ceil(
                config.max_tokens / objective.tokens_per_step(train_source)))
    token_budget = config.max_tokens if planned is None else None
    base_lr = config.resolved_lr(sae.cfg.d_sae)
    schedule = objective.schedule(base_lr, total_steps)
    optimizer = make_optimizer(sae, config, base_lr)

    if resume_from is not None:
        state = load_checkpoint(resume_from, sae=sae, optimizer=optimizer, config=config)
        objective.load_state_dict(state.objective)
        reporter.on_message(f"resumed from {resume_from} at step {state.step}")
    else:
        state = TrainerState()
        trained = bool(sae.data_initialized)
        with timed_phase("startup"):
            objective.initialize(sae, train_source, init_weights=not trained)
        if trained:  # a trained SAE (a second phase, --init-from): continue, never re-initialise
            reporter.on_message("continuing from trained weights (b_dec, input scale, threshold "
                                "and dead counters kept)")
        sae.normalize_decoder()
    history = [MetricsRecord.from_dict(r) for r in state.history]

    if state.finished:  # resumed from the checkpoint written at the end: nothing left to do
        sae.eval()
        result = _result(sae, state, history, history[-1] if history else None, out, None)
        reporter.on_message(f"training had already finished at step {state.step}")
        reporter.on_train_end(result)
        return result

    for warning in objective.warnings(train_source):
        reporter.on_message(warning)
    loop = _Loop(sae, train_source, val_source, config, objective, optimizer, reporter, out,
                 state, history, total_steps, evaluators)
    sae.train()
    reporter.on_train_start(total_steps=total_steps, start_step=state.step,
                            description=f"{sae.architecture} d_sae={sae.cfg.d_sae}")
    last_ckpt: Optional[Path] = None
    with _DeferredInterrupt() as interrupt, timed_phase("train"):
        while state.step < total_steps and state.epoch < config.num_epochs:
            for batch in objective.iter_batches(train_source, epoch=state.epoch,
                                                start_batch=state.batch_in_epoch):
                loop.train_step(batch, schedule.lr(state.step))
                last = state.step >= total_steps or (
                    token_budget is not None and state.tokens_seen >= token_budget)
                if last:
                    break
                ckpt_due = (out is not None and config.checkpoint_every is not None
                            and state.step % config.checkpoint_every == 0)
                if ckpt_due or state.step % config.log_freq == 0:
                    last_ckpt = loop.report(checkpoint=ckpt_due) or last_ckpt
                if interrupt.requested:
                    if out is not None:
                        path = loop.write_checkpoint()
                        reporter.on_message(f"interrupted at step {state.step}; checkpoint {path}")
                    reporter.on_train_end(None)
                    raise KeyboardInterrupt
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
                continue
            break

    sae.eval()
    message = loop.calibrate(sae)
    if message:
        reporter.on_message(message)
    message = objective.finalize(sae, train_source, val_source)
    if message:
        reporter.on_message(message)
    state.finished = True
    # the SAE itself is now what export ships (calibrated just above): no calibrated copy
    last_ckpt = loop.report(checkpoint=out is not None, model=sae) or last_ckpt
    final = history[-1]
    final_dir = None
    if out is not None:
        final_dir = out / "final"
        with timed_phase("checkpoint"), atomic_directory(final_dir, kind="sae") as tmp:
            sae.save(tmp, history=[r.to_dict() for r in history])
    result = _result(sae, state, history, final, out, final_dir, last_ckpt)
    reporter.on_train_end(result)
    return result


def make_optimizer(sae: SAE, config: TrainingConfig, lr: float) -> torch.optim.Adam:
    """Adam over the SAE's parameters; the fused kernel (one pass per tensor, ~4x faster than
    the default on CPU) where this device/dtype has it."""
    kwargs: dict[str, Any] = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_eps)
    try:
        return torch.optim.Adam(sae.parameters(), fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(sae.parameters(), **kwargs)


def _result(sae: SAE, state: TrainerState, history: list[MetricsRecord],
            final: Optional[MetricsRecord], out: Optional[Path], final_dir: Optional[Path],
            last_ckpt: Optional[Path] = None) -> TrainResult:
    best_dir = out / "best" if out is not None and (out / "best").exists() else None
    if final_dir is None and out is not None and (out / "final").exists():
        final_dir = out / "final"
    return TrainResult(sae=sae, history=history, final=final, steps=state.step,
                       tokens_seen=state.tokens_seen, best_value=state.best_value,
                       best_step=state.best_step, out_dir=out, final_dir=final_dir,
                       best_dir=best_dir, last_checkpoint=last_ckpt)


class _Loop:
    """The per-step work and the reporting/checkpointing of one ``train_sae`` call."""

    def __init__(self, sae: SAE, train_source: Any, val_source: Any, config: TrainingConfig,
                 objective: Objective, optimizer: torch.optim.Optimizer, reporter: Reporter,
                 out: Optional[Path], state: TrainerState, history: list[MetricsRecord],
                 total_steps: int, evaluators: EvaluationSuite):
        self.sae, self.train_source, self.val_source = sae, train_source, val_source
        self.total_steps = total_steps
        self.evaluators = evaluators
        self.config, self.objective, self.optimizer = config, objective, optimizer
        self.reporter, self.out, self.state, self.history = reporter, out, state, history
        self.window = _Window()
        self.window.load_state_dict(state.window)  # a Ctrl-C checkpoint's window in progress
        self.lr = optimizer.param_groups[0]["lr"]
        self.params = [p for p in sae.parameters() if p.requires_grad]
        self.started = time.perf_counter()

    def train_step(self, batch: Any, lr: float) -> None:
        """One optimizer step, timed as the objective's phase of this batch (``train`` for
        local steps, ``finetune`` for a two-phase run's end-to-end ones)."""
        with timed_phase(self.objective.step_phase(batch)):
            self._train_step(batch, lr)

    def _train_step(self, batch: Any, lr: float) -> None:
        state, sae = self.state, self.sae
        step_no = state.step + 1
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with self.autocast():
                out = self.objective.step(sae, batch)
        except NonFiniteActivationError as exc:
            raise NonFiniteActivationError(
                f"step {step_no} (epoch {state.epoch}, batch {state.batch_in_epoch}): {exc}"
            ) from None
        if not bool(torch.isfinite(out.loss)):
            raise TrainingDivergedError(
                f"step {step_no}: the training loss is {float(out.loss.detach())} (diverged); "
                f"lower TrainingConfig.lr (now {lr:.3g}) or check the data")
        out.loss.backward()
        sae.project_decoder_gradients()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        sae.normalize_decoder()
        sae.update_training_state(out.fired, out.running,
                                  TrainingProgress(step_no, self.total_steps))
        tokens = self.objective.batch_tokens(batch)
        state.step = step_no
        state.batch_in_epoch += 1
        state.tokens_seen += tokens
        self.window.add(out.loss, out.stats, tokens)
        self.reporter.on_step(step_no)

    def autocast(self) -> Any:
        """``TrainingConfig.autocast``: bf16 autocast on the SAE's device, else nothing."""
        if self.config.autocast != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.sae.W_enc.device.type, dtype=torch.bfloat16)

    def calibrate(self, sae: SAE) -> Optional[str]:
        """Calibrate ``sae``'s inference encoding on the calibration tokens (when it needs it:
        ``sae.needs_calibration``, from its own options); a message for the reporter."""
        if not sae.needs_calibration:
            return None
        with timed_phase("calibration"):
            batches = self.objective.calibration_batches(self.train_source)
            message = sae.calibrate(batches)
        if message is None:
            return "inference encoding not calibrated: the calibration source has no tokens"
        return f"inference encoding calibrated on training tokens: {message}"

    def shipped(self) -> SAE:
        """The model ``export`` would ship now: the SAE itself, or a calibrated copy of it."""
        if not self.sae.needs_calibration:
            return self.sae
        copy = self.sae.clone()
        self.calibrate(copy)
        return copy

    def evaluate(self, model: SAE) -> MetricsRecord:
        state, sae = self.state, self.sae
        loss, terms = self.window.means()
        elapsed = time.perf_counter() - self.window.started
        record = MetricsRecord(
            step=state.step, tokens_seen=state.tokens_seen, epoch=state.epoch, lr=self.lr,
            loss=loss, loss_terms=terms,
            elapsed_s=time.perf_counter() - self.started,
            tokens_per_s=(self.window.tokens / elapsed
                          if elapsed > 0 and self.window.tokens else None),
        )
        was_training = model.training
        model.eval()
        metrics: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        if self.val_source is not None:
            with timed_phase("eval_val"):
                val, budget = self.val_source, self.config.eval_max_tokens
                metrics, seconds = self.evaluators.evaluate(
                    model, val, split=getattr(val, "split", None) or "val", max_tokens=budget,
                    final=self.state.finished,
                    objective_pass=lambda: self.objective.evaluate(model, val, budget))
            metrics.setdefault("eval_split", getattr(self.val_source, "split", None) or "val")
        elif terms:  # no held-out data: training-window averages
            metrics = {k: terms[k] for k in ("mse", "explained_variance") if k in terms}
            if "explained_variance" in metrics:
                metrics["fvu"] = 1.0 - metrics["explained_variance"]
            if "l0" in terms:
                metrics["l0_train"] = terms["l0"]
            metrics["eval_split"] = "train"
        model.train(was_training)
        apply_figures(record, metrics, seconds)
        record.dead_fraction_train = float(sae.dead_mask().float().mean())
        record.threshold = model.inference_threshold()
        self.window.reset()
        return record

    def report(self, *, checkpoint: bool, model: Optional[SAE] = None) -> Optional[Path]:
        """Evaluate ``model`` (default: what export would ship now), keep the best, checkpoint."""
        model = model if model is not None else self.shipped()
        record = self.evaluate(model)
        self.history.append(record)
        self.state.history.append(record.to_dict())
        self._maybe_save_best(record, model)
        path = self.write_checkpoint() if checkpoint else None
        with timed_phase("report"):
            self.reporter.on_metrics(record, str(path) if path is not None else None)
        return path

    def _maybe_save_best(self, record: MetricsRecord, model: SAE) -> None:
        value = record.get(self.config.best_metric)
        if value is None or not math.isfinite(value):
            return
        best = self.state.best_value
        better = best is None or (value > best if self.config.best_mode == "max" else value < best)
        if not better:
            return
        self.state.best_value, self.state.best_step = float(value), record.step
        if self.out is not None and self.config.save_best:
            with timed_phase("checkpoint"), \
                    atomic_directory(self.out / "best", kind="sae") as tmp:
                model.save(tmp, history=self.state.history)

    def write_checkpoint(self) -> Path:
        with timed_phase("checkpoint"):
            return self._write_checkpoint()

    def _write_checkpoint(self) -> Path:
        assert self.out is not None
        self.state.objective = self.objective.state_dict()
        self.state.window = self.window.state_dict()
        path = self.out / CHECKPOINTS_DIR / checkpoint_name(self.state.step)
        save_checkpoint(path, sae=self.sae, optimizer=self.optimizer, state=self.state,
                        config=self.config)
        for old in list_checkpoints(self.out)[: -self.config.keep_checkpoints]:
            remove_output(old, "checkpoint")  # only a folder that is one of our checkpoints
        return path
