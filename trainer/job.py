"""``sae-sweep train``: one SAE trained from an activation cache, configured by one YAML file.

Example (``examples/train.yaml``)::

    cache: runs/cache-smollm2
    out_dir: runs/train-l6-batchtopk-k32
    sae: {d_in: 576, d_sae: 4608, architecture: batchtopk, top_k: 32, hook_layer: 6}
    training: {num_epochs: 20, train_batch_tokens: 1024, lr: 0.001, log_freq: 25}

The output folder gets ``job.yaml`` (the config used), ``checkpoints/``, ``best/``, ``final/``
(native format, see trainer.training) and ``saelens/`` (``export_saelens``). Re-running the
same command resumes from the latest checkpoint unless ``resume=False``.
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
from .job_sources import job_sources
from .registry import build_sae, load_sae, sae_config_from_dict
from .reporting import ConsoleReporter, Reporter
from .sae_config import SAEConfig
from .saelens_export import export_saelens
from .training import TrainResult, train_sae
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
    """Cache split for validation metrics and threshold calibration (null: none; skipped with a
    message when the cache has no such split)."""
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
                      f"must differ from train_split ({self.train_split!r}): validation, "
                      "best-model selection and threshold calibration need held-out tokens")

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
    opener = getattr(activation_cache, "open_cache", None)
    if opener is None:  # pragma: no cover - only before the cache reader is installed
        raise ConfigError("activation_cache.open_cache is not available in this installation")
    return opener(uri)


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
    """Run the training job described by the YAML file ``path`` (see the module docstring)."""
    job = TrainJobConfig.from_yaml(Path(path))
    out = Path(out_dir) if out_dir is not None else Path(job.out_dir)
    reporter = reporter or ConsoleReporter(show_progress=job.training.show_progress)
    reader = _open_cache(job.cache)
    hook = job.hook
    assert hook is not None
    d_in = reader.token_source(hook, job.train_split).d_in
    if d_in != job.sae.d_in:
        raise DimensionMismatchError(
            f"{path}: sae.d_in is {job.sae.d_in} but the cache {job.cache} stores "
            f"{hook} with d_in={d_in}; set sae.d_in: {d_in}")
    splits = reader.manifest.get("splits", {}) if hasattr(reader, "manifest") else {}
    if job.val_split is not None and job.val_split not in splits:
        reporter.on_message(f"cache has no {job.val_split!r} split: training without "
                            "validation (metrics are training-batch averages)")
    sources = job_sources(reader, job.training, hook, train_split=job.train_split,
                          val_split=job.val_split, test_split=None,
                          device=job.sae.torch_device(), target_hook=job.sae.hook_spec_out)
    objective, train_source, val_source = sources.objective, sources.train, sources.val
    if objective is not None:
        reporter.on_message(objective.describe(train_source))

    resume_from = latest_checkpoint(out) if resume else None
    if not resume and (out / CHECKPOINTS_DIR).exists():
        reporter.on_message(f"--no-resume: removing the old checkpoints in {out / CHECKPOINTS_DIR}")
        shutil.rmtree(out / CHECKPOINTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    job.to_yaml(out / "job.yaml")
    sae = _initial_sae(job, path)
    result = train_sae(sae, train_source, job.training, val_source=val_source, out_dir=out,
                       resume_from=resume_from, reporter=reporter, objective=objective)
    written = [d for d in (result.final_dir, result.best_dir) if d is not None]
    if job.export_saelens:
        export_saelens(result.sae, out / "saelens")
        written.append(out / "saelens")
    reporter.on_message(summarize_training(result, hook, written))
    return result


def summarize_training(result: TrainResult, hook: str, written: list[Path]) -> str:
    """What ``sae-sweep train`` prints at the end: the run and where its outputs are."""
    final = result.final
    bits = [f"{name} {value:.4g}" for name, value in (
        ("fvu", getattr(final, "fvu", None)), ("l0", getattr(final, "l0_inference", None)
                                                or getattr(final, "l0_train", None)),
        ("dead", getattr(final, "dead_fraction", None))) if value is not None]
    seconds = getattr(final, "elapsed_s", None)
    return (f"trained {result.sae.architecture} d_sae={result.sae.cfg.d_sae} on {hook}: "
            f"{result.steps} steps, {result.tokens_seen:,} tokens"
            + (f" in {seconds:.1f} s" if seconds else "")
            + (f"; final {', '.join(bits)}" if bits else "")
            + f"\nwrote {', '.join(str(d) for d in written)}"
            + (f" (checkpoints in {result.out_dir / CHECKPOINTS_DIR})" if result.out_dir else ""))
