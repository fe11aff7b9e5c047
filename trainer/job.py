"""``sae-sweep train``: one SAE trained from an activation cache, configured by one YAML file.

Example (``examples/train.yaml``)::

    cache: runs/cache-smollm2
    out_dir: runs/train-l6-batchtopk-k32
    sae: {d_in: 576, d_sae: 4608, architecture: batchtopk, top_k: 32, hook_layer: 6}
    training: {num_epochs: 20, train_batch_tokens: 1024, log_freq: 25}

The output folder gets ``job.yaml`` (the config used), ``checkpoints/``, ``best/``, ``final/``
(native format, see trainer.training) and ``saelens/`` (``export_sae``: the same SAELens
metadata and README.md card as ``sae-sweep export``). Re-running the same command resumes from
the latest checkpoint unless ``resume=False``. The output folder must be new, empty, or a
training folder of ours (``output_folder``): one holding anything else is refused before any
work, and nothing in it is touched. When the cache has a test split, the shipped SAE is also
evaluated on it at the end: the card and the closing line report its val and test figures.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import activation_cache
from activation_cache import ConfigError, StrictConfig

from .checkpoint import CHECKPOINTS_DIR, latest_checkpoint
from .errors import DimensionMismatchError
from .eval_job import evaluate_split
from .job_sources import job_sources
from .metrics import MetricsRecord
from .model_card import CARD_METRICS, cache_facts, figures_text, render_model_card
from .output_folder import check_output_folder, claim_output_folder, remove_output
from .registry import build_sae, load_sae, sae_config_from_dict
from .reporting import ConsoleReporter, Reporter
from .sae_config import SAEConfig
from .saelens_export import export_sae
from .training import TrainResult, train_sae
from .timing import (EVAL_COLUMN, TRAINING_PHASES, WALL_COLUMN, PhaseTimer, active_timer,
                     phase_column, timed_phase)
from .training_config import TrainingConfig


@dataclass
class TrainJobConfig(StrictConfig):
    """One ``sae-sweep train`` job: which cache and hook, which SAE, how to train it."""

    cache: str
    """Activation cache folder or URI (written by ``sae-sweep cache``)."""
    sae: SAEConfig
    """The SAE to train; ``sae.d_in`` must match the cache's width at the hook."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """How to train it."""
    hook: Optional[str] = None
    """Cached hook to train on; defaults to (and must agree with) ``sae.hook_spec``."""
    out_dir: str = "runs/train"
    """Output folder (``sae-sweep train --out`` overrides it)."""
    train_split: str = "train"
    """Cache split to train on."""
    val_split: Optional[str] = "val"
    """Cache split for selection: the validation records, ``best/`` and ``best_metric`` (null:
    none; skipped with a message when the cache has no such split). An inference threshold is
    calibrated on training tokens, never on this split."""
    test_split: Optional[str] = "test"
    """Cache split the shipped SAE is evaluated on at the end, for the reported figures (the
    card, the closing line); nothing is tuned on it (null, or absent from the cache: none)."""
    export_saelens: bool = True
    """Also write ``OUT/saelens`` (SAELens format) at the end."""

    def validate(self) -> None:
        self._require(isinstance(self.cache, str) and bool(self.cache), "cache",
                      f"must be a cache folder or URI, got {self.cache!r}")
        self._require(isinstance(self.sae, SAEConfig), "sae",
                      "must be a mapping of SAEConfig fields")
        self._require(isinstance(self.training, TrainingConfig), "training",
                      "must be a mapping of TrainingConfig fields")
        if self.hook is None:
            self.hook = self.sae.hook_spec
        elif self.hook != self.sae.hook_spec:
            self._fail("hook", f"{self.hook!r} differs from sae.hook_spec {self.sae.hook_spec!r}; "
                       "set sae.hook_spec (or sae.hook_layer/hook_name) to the cached hook")
        self._require(bool(self.out_dir), "out_dir", "must be a folder path")
        self._require(self.val_split != self.train_split, "val_split",
                      f"must differ from train_split ({self.train_split!r}): validation and "
                      "best-model selection need held-out tokens")
        self._require(self.test_split is None or self.test_split not in (
            self.train_split, self.val_split), "test_split",
            f"must differ from train_split and val_split ({self.train_split!r}, "
            f"{self.val_split!r}): the reported figures need tokens nothing was tuned on")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out["hook"] == self.sae.hook_spec:
            del out["hook"]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "TrainJobConfig":
        # the flat `sae:` block names its architecture's fields: the registry reads it
        if isinstance(data, dict) and isinstance(data.get("sae"), dict):
            try:
                data = {**data, "sae": sae_config_from_dict(data["sae"])}
            except ConfigError as exc:
                raise ConfigError(f"TrainJobConfig.sae -> {exc}") from None
        return super().from_dict(data)  # type: ignore[return-value]


def _open_cache(uri: str) -> Any:
    return activation_cache.open_cache(uri)


def _initial_sae(job: "TrainJobConfig", path: str | Path) -> Any:
    """A fresh SAE of ``job.sae``, or the trained one ``training.init_from`` names (checked
    against the job's SAE config: architecture, d_in, d_sae and hook must agree)."""
    if job.training.init_from is None:
        return build_sae(job.sae, seed=job.training.seed)
    saved = load_sae(job.training.init_from).cfg
    for name in ("architecture", "d_in", "d_sae", "hook_spec", "hook_spec_out", "d_out"):
        mine, theirs = getattr(job.sae, name), getattr(saved, name)
        if mine != theirs:
            raise ConfigError(f"{path}: training.init_from {job.training.init_from} is an SAE "
                              f"with {name}={theirs!r}, but the job's sae.{name} is {mine!r}")
    # the saved weights and buffers, under the job's own options (e.g. its threshold rule)
    return load_sae(job.training.init_from, config=job.sae)


def train_from_yaml(path: str | Path, *, out_dir: str | Path | None = None, resume: bool = True,
                    reporter: Optional[Reporter] = None) -> TrainResult:
    """Run the training job described by the YAML file ``path`` (see the module docstring).
    Where its wall time went is ``result.extra["timing"]`` (``trainer.timing``'s columns) and a
    line of the closing summary."""
    with PhaseTimer().activate():
        return _train_job(path, out_dir=out_dir, resume=resume, reporter=reporter)


def _train_job(path: str | Path, *, out_dir: str | Path | None, resume: bool,
               reporter: Optional[Reporter]) -> TrainResult:
    job = TrainJobConfig.from_yaml(Path(path))
    out = Path(out_dir) if out_dir is not None else Path(job.out_dir)
    flag = "--out" if out_dir is not None else "out_dir"
    check_output_folder(out, "train", flag=flag)  # before any work: refused, nothing touched
    reporter = reporter or ConsoleReporter(show_progress=job.training.show_progress)
    with timed_phase("startup"):
        reader = _open_cache(job.cache)
        hook = job.hook
        assert hook is not None
        d_in = reader.token_source(hook, job.train_split).d_in
    if d_in != job.sae.d_in:
        raise DimensionMismatchError(
            f"{path}: sae.d_in is {job.sae.d_in} but the cache {job.cache} stores "
            f"{hook} with d_in={d_in}; set sae.d_in: {d_in}")
    splits = reader.manifest.get("splits", {})
    if job.val_split is not None and job.val_split not in splits:
        reporter.on_message(f"cache has no {job.val_split!r} split: training without "
                            "validation (metrics are training-batch averages)")
    with timed_phase("startup"):
        sources = job_sources(reader, job.training, hook, train_split=job.train_split,
                              val_split=job.val_split, test_split=job.test_split,
                              device=job.sae.torch_device(), target_hook=job.sae.hook_spec_out)
    objective, train_source, val_source = sources.objective, sources.train, sources.val
    if objective is not None:
        reporter.on_message(objective.describe(train_source))

    claim_output_folder(out, "train", flag=flag, description=f"sae-sweep train {path}")
    resume_from = latest_checkpoint(out) if resume else None
    if not resume and (out / CHECKPOINTS_DIR).exists():
        reporter.on_message(f"--no-resume: removing the old checkpoints in {out / CHECKPOINTS_DIR}")
        for old in sorted((out / CHECKPOINTS_DIR).iterdir()):  # each checked to be ours above
            if not remove_output(old, "checkpoint") and old.is_dir():
                shutil.rmtree(old)  # our own .step_X.tmp-PID leftover
    job.to_yaml(out / "job.yaml")
    with timed_phase("startup"):
        sae = _initial_sae(job, path)
    result = train_sae(sae, train_source, job.training, val_source=val_source, out_dir=out,
                       resume_from=resume_from, reporter=reporter, objective=objective,
                       evaluators=sources.evaluators)
    figures = {}
    if result.final is not None:
        figures[result.final.eval_split or "val"] = result.final
    if sources.test is not None:
        test = evaluate_split(result.sae, sources.test, job.training, split="test",
                              objective=objective, evaluators=sources.evaluators)
        result.extra["test"] = test
        figures["test"] = test
    written = [d for d in (result.final_dir, result.best_dir) if d is not None]
    if job.export_saelens:
        with timed_phase("export"):
            facts = cache_facts(job.cache, manifest=reader.manifest)
            card = training_card(job, path, result, figures, facts)
            written.append(export_sae(result.sae, out / "saelens", facts=facts, card=card))
    summary = summarize_training(result, hook, written, figures)
    timer = active_timer()
    if timer is not None:
        result.extra["timing"] = timer.columns()
        summary += "\n" + timing_line(result.extra["timing"])
    reporter.on_message(summary)
    return result


def timing_line(columns: dict[str, float]) -> str:
    """``"  time: 82% of 50.2 s in training steps (train 40.1 s, ...)"``: the closing line of
    where a job's wall time went (``PhaseTimer.columns()``), largest phases first."""
    wall = columns.get(WALL_COLUMN, 0.0)
    trained = sum(columns.get(phase_column(p), 0.0) for p in TRAINING_PHASES)
    parts = sorted(((v, k[len("time_"):-len("_s")]) for k, v in columns.items()
                    if k not in (WALL_COLUMN, EVAL_COLUMN) and v > 0.01 * wall), reverse=True)
    share = f"{trained / wall:.0%} of " if wall > 0 else ""
    return (f"  time: {share}{wall:.1f} s in training steps ("
            + ", ".join(f"{name} {_seconds(v)}" for v, name in parts) + ")")


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value >= 1 else f"{value:.2f} s"


def _figure_values(record: MetricsRecord) -> dict[str, Any]:
    return {k: record.get(k) for k in CARD_METRICS}


def training_card(job: TrainJobConfig, path: str | Path, result: TrainResult,
                  figures: dict[str, MetricsRecord], facts: dict[str, Any]) -> str:
    """The README.md of ``OUT/saelens``: the card ``sae-sweep export`` writes, with this job's
    settings and the shipped SAE's figures per split."""
    defaults = TrainingConfig().to_dict()
    settings = {k: v for k, v in job.training.to_dict().items()
                if v != defaults.get(k) and k not in ("show_progress",)}
    settings["lr (used)"] = job.training.resolved_lr(job.sae.d_sae)
    seconds = result.final.elapsed_s if result.final is not None else None
    return render_model_card(
        result.sae.cfg, facts=facts, output_format="saelens",
        origin=f"Trained by `sae-sweep train {path}` (output folder `{result.out_dir}`).",
        budget=(f"training: {result.steps:,} steps, {result.tokens_seen:,} tokens"
                + (f" in {seconds:.1f} s" if seconds else "")),
        parameters_title="Training settings (those not at their defaults)",
        parameters=settings,
        figures={split: _figure_values(r) for split, r in figures.items()})


def summarize_training(result: TrainResult, hook: str, written: list[Path],
                       figures: Optional[dict[str, MetricsRecord]] = None) -> str:
    """What ``sae-sweep train`` prints at the end: the run, the shipped SAE's figures labelled
    with their split, and where its outputs are."""
    if figures is None:
        figures = {} if result.final is None else {result.final.eval_split or "val": result.final}
    seconds = result.final.elapsed_s if result.final is not None else None
    shown = figures_text({s: _figure_values(r) for s, r in figures.items()},
                         names=("fvu", "l0", "dead_fraction"))
    lines = [f"trained {result.sae.architecture} d_sae={result.sae.cfg.d_sae} on {hook}: "
             f"{result.steps:,} steps, {result.tokens_seen:,} tokens"
             + (f" in {seconds:.1f} s" if seconds else "")]
    if shown:
        lines.append(f"  shipped encoder: {shown}")
    out = result.out_dir
    if out is not None:
        parts = [f"{d.name}/" if d.parent == out else str(d) for d in written]
        if (out / CHECKPOINTS_DIR).exists():
            parts.append(f"{CHECKPOINTS_DIR}/")
        lines.append(f"  wrote {out}: {', '.join(parts)}")
    elif written:
        lines.append(f"  wrote {', '.join(str(d) for d in written)}")
    return "\n".join(lines)
