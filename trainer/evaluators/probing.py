"""The ``probing`` evaluator: sparse probing of the shipped encoder on a cache's probe sets, the
sae-probes / SAEBench recipe (Kantamneni et al. 2025; activation_cache/probes.py stores the
pooled activations at build time, so a trial never runs the model).

For each probe set (its texts' **last-token** activations of the SAE's input hook):

1. encode the probe-train part and the evaluated part with the shipped encoder (``sae.encode``);
2. rank the latents on the probe-train part by ``|mean(z | y=1) - mean(z | y=0)|`` after
   dividing each latent by its mean absolute activation over the texts where it is non-zero
   (sae-probes' "mean" normalisation: a latent of large magnitude is not favoured for its
   scale); take the top k, for k in 1, 2, 5, 20;
3. fit an L2 logistic regression (scikit-learn, lbfgs, max_iter 1000) on those k latents (as
   encoded, not normalised). Its C is chosen from ``logspace(5, -5, 10)`` inside the probe-train
   part, by ROC AUC: with fewer than 128 texts by stratified 6-fold cross-validation, else on
   the last ``min(20 %, 100)`` texts held out; the probe is then refitted on the whole train
   part (rows shuffled by the seed), as sae-probes does;
4. its accuracy on the **val** part (selection: a trial's val records, the sweep objective) or
   the **test** part (reported figures), as the caller's split says.

The same probe on the raw activations (all d dimensions, same C search) is the ceiling; it does
not depend on the SAE, so it is fitted once per job (in ``prepare``).

Fields (means over the probe sets): ``probe_accuracy_k1`` ... ``probe_accuracy_k20``;
``probe_accuracy_raw`` (the ceiling: a figure of the data, not of the SAE, so bookkeeping);
``probe_accuracy_ratio_k1`` ... ``_k20``: the mean over sets of accuracy_k / accuracy_raw
(1: the k latents probe as well as the whole activation). It runs only at final evaluations
(``every_evaluation = False``: the end-of-training val record and the reported test figures).
"""

from __future__ import annotations

import hashlib

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import EvaluationContext, EvaluationData, Evaluator, EvaluatorDataError, MetricField
from .registration import register_evaluator

KS = (1, 2, 5, 20)
"""How many latents each sparse probe uses."""
C_GRID = np.logspace(5, -5, 10)
"""The inverse regularisation strengths the probe's C is chosen from (sae-probes' grid)."""
SEED = 42
"""The probes' random state (sae-probes' default seed)."""


def mean_abs_normalise(z: Tensor) -> Tensor:
    """Each column divided by its mean |value| over its non-zero entries (0-columns stay 0)."""
    nonzero = (z != 0).sum(0).to(z.dtype)
    scale = z.abs().sum(0) / (nonzero + 1e-6)
    return z / (scale + 1e-6)


def rank_latents(z_train: Tensor, y_train: Tensor) -> Tensor:
    """Latent indices by decreasing |class-mean difference| of the normalised codes."""
    zn = mean_abs_normalise(z_train.double())
    y = y_train.bool()
    diff = zn[y].mean(0) - zn[~y].mean(0)
    return torch.argsort(diff.abs(), descending=True, stable=True)


def _cv_splits(n: int, y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Where C is chosen, inside the train part: 6 stratified folds below 128 texts, else the
    last min(20 %, 100) texts held out; only folds whose validation holds both labels."""
    from sklearn.model_selection import StratifiedKFold

    if n < 128:
        folds = StratifiedKFold(n_splits=6, shuffle=True, random_state=seed).split(
            np.zeros(n), y)
        return [(a, b) for a, b in folds if len(np.unique(y[b])) == 2]
    held = min(int(0.2 * n), 100)
    return [(np.arange(n - held), np.arange(n - held, n))]


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, *, seed: int = SEED):
    """An L2 logistic regression whose C is chosen by ROC AUC inside the train part (module
    docstring, step 3), refitted on the whole train part."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        best_c, best = None, -np.inf
        splits = _cv_splits(len(y_train), y_train, seed)
        for c in C_GRID:
            scores = []
            for a, b in splits:
                if len(np.unique(y_train[a])) < 2:
                    scores.append(0.5)
                    continue
                m = LogisticRegression(C=c, random_state=seed, max_iter=1000)
                m.fit(x_train[a], y_train[a])
                scores.append(roc_auc_score(y_train[b], m.predict_proba(x_train[b])[:, 1]))
            score = float(np.mean(scores)) if scores else -np.inf
            if score > best:
                best_c, best = c, score
        shuffle = np.random.RandomState(seed).permutation(len(y_train))
        model = LogisticRegression(C=best_c if best_c is not None else 1.0, random_state=seed,
                                   max_iter=1000)
        model.fit(x_train[shuffle], y_train[shuffle])
    return model


def probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray,
                   y_eval: np.ndarray, *, seed: int = SEED) -> float:
    """Accuracy on (x_eval, y_eval) of the probe fitted on (x_train, y_train)."""
    model = fit_probe(x_train, y_train, seed=seed)
    return float((model.predict(x_eval) == y_eval).mean())


def sparse_probe_accuracies(z_train: Tensor, y_train: Tensor, z_eval: Tensor, y_eval: Tensor,
                            ks: tuple[int, ...] = KS, *, seed: int = SEED) -> dict[int, float]:
    """{k: accuracy on the eval part of the probe on the top-k latents} (steps 2-4)."""
    order = rank_latents(z_train, y_train)
    zt, ze = z_train.double().numpy(), z_eval.double().numpy()
    yt, ye = y_train.numpy(), y_eval.numpy()
    out = {}
    for k in ks:
        cols = order[:k].numpy()
        out[k] = probe_accuracy(zt[:, cols], yt, ze[:, cols], ye, seed=seed)
    return out


@torch.no_grad()
def encode_rows(sae: Any, x: Tensor, batch: int = 1024) -> Tensor:
    """The shipped encoder's codes of rows ``x`` (float32, on the CPU)."""
    device = sae.W_enc.device
    was = sae.training
    sae.eval()
    try:
        parts = [sae.encode(x[i:i + batch].to(device)).float().cpu()
                 for i in range(0, len(x), batch)]
    finally:
        sae.train(was)
    return torch.cat(parts) if parts else torch.zeros(0, sae.cfg.d_sae)


_RAW_CEILINGS: dict[str, dict[str, float]] = {}
"""Per process, the raw-activation probe's val/test accuracy by the sha1 of its set's parts:
a figure of the data alone, so the trials a Ray worker runs one after another fit it once."""


def raw_ceiling(parts: dict[str, tuple[Any, Any]]) -> dict[str, float]:
    """The raw-activation probe of one set (fitted on its train part): accuracy on val and
    test, remembered per process by the content of the parts."""
    digest = hashlib.sha1()
    for p in ("train", "val", "test"):
        for array in parts[p]:
            digest.update(np.ascontiguousarray(array.numpy()).tobytes())
    key = digest.hexdigest()
    if key not in _RAW_CEILINGS:
        (xt, yt) = parts["train"]
        model = fit_probe(xt.numpy(), yt.numpy())
        _RAW_CEILINGS[key] = {p: float((model.predict(parts[p][0].numpy())
                                        == parts[p][1].numpy()).mean()) for p in ("val", "test")}
    return dict(_RAW_CEILINGS[key])


def _field_list() -> tuple[MetricField, ...]:
    out = [MetricField(f"probe_accuracy_k{k}", f"sparse-probe accuracy on the top {k} "
                       "latent(s) by class-mean difference (mean over probe sets)", "higher",
                       headline=k == 1)  # SAEBench's headline: the top-1 latent's probe
           for k in KS]
    out.append(MetricField("probe_accuracy_raw", "the same probe on the raw activations (the "
                           "ceiling; mean over probe sets)", "higher", bookkeeping=True))
    out += [MetricField(f"probe_accuracy_ratio_k{k}", f"probe_accuracy_k{k} / the raw probe's "
                        "accuracy (mean over probe sets)", "higher") for k in KS]
    return tuple(out)


@register_evaluator
class ProbingEvaluator(Evaluator):
    """Sparse probing on the cache's probe sets (module docstring)."""

    name = "probing"
    description = "sparse probing (sae-probes recipe) on the cache's probe sets"
    needs = ("probes",)
    every_evaluation = False
    order = 300
    fields = _field_list()

    def __init__(self) -> None:
        self.sets: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
        self.raw: dict[str, dict[str, float]] = {}

    def prepare(self, data: EvaluationData) -> None:
        reader = data.reader
        names = reader.probe_sets() if reader is not None and hasattr(reader, "probe_sets") \
            else []
        if not names:
            raise EvaluatorDataError(
                f"evaluator probing needs probe sets (a `probes:` section in the cache YAML), "
                f"but {data.cache_name()} holds none; drop probing from training.evaluators "
                "or rebuild the cache with `probes:`")
        hook = data.hook
        for name in names:
            ps = reader.probe_set(name)
            if hook not in ps.acts:
                raise EvaluatorDataError(
                    f"evaluator probing: probe set {name!r} of {data.cache_name()} has no "
                    f"activations of the SAE's hook {hook!r} (it has {', '.join(ps.acts)})")
            self.sets[name] = {p: ps.part(p, hook) for p in ("train", "val", "test")}
            self.raw[name] = raw_ceiling(self.sets[name])

    def evaluate(self, sae: Any, ctx: EvaluationContext) -> dict[str, Any]:
        assert self.sets, "prepare() was not called"
        part = "test" if ctx.split == "test" else "val"
        acc = {k: [] for k in KS}
        ratio = {k: [] for k in KS}
        raw = []
        for name, parts in self.sets.items():
            (xt, yt), (xe, ye) = parts["train"], parts[part]
            got = sparse_probe_accuracies(encode_rows(sae, xt), yt, encode_rows(sae, xe), ye)
            r = self.raw[name][part]
            raw.append(r)
            for k in KS:
                acc[k].append(got[k])
                ratio[k].append(got[k] / r if r > 0 else float("nan"))
        out: dict[str, Any] = {f"probe_accuracy_k{k}": float(np.mean(acc[k])) for k in KS}
        out["probe_accuracy_raw"] = float(np.mean(raw))
        out.update({f"probe_accuracy_ratio_k{k}": float(np.mean(ratio[k])) for k in KS})
        return out
