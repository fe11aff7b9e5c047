"""End-to-end training and evaluation: the SAE spliced into the live (frozen) model.

``EndToEndObjective`` implements the objective seam (trainer/objective.py) on whole windows
(``SequenceBatch``es from the activation cache, served by :class:`SequenceSource`). One step:

1. **The SAE's own terms**, from its training forward (``sae.training_forward``, exactly the
   local trainer's, whatever the architecture) on the train-mask tokens of the batch, in chunks
   of ``activation_batch_size`` sequences (each chunk is one training-encoding batch, e.g. one
   BatchTopK batch): ``reconstruction_loss_weight × reconstruction`` + the architecture's own
   penalties. The chunks' running statistics (e.g. BatchTopK's smallest selected activation)
   are merged with ``sae.merge_running``, so every chunk reaches the threshold EMA.
2. **The splice**: the reconstruction replaces the **output hook**'s activations
   (``SAEConfig.hook_spec_out``: an SAE's own hook; a transcoder's output, e.g. the MLP output
   computed from the cached MLP input of the same windows) on train-mask tokens only (padding,
   BOS and excluded tokens keep their clean values) and the rest of the model runs, restarting
   at the splice point from the cached residual (trainer/splice.py). The input the SAE encodes
   is the cached clean value of its input hook, which is what the live pass computes there too
   (the input hook is upstream of the output hook it replaces).
3. **End-to-end terms**, averaged over the batch's train-mask tokens:
   ``logit_kl_weight × s × KL(clean ‖ spliced)`` of the next-token distributions at temperature
   ``kl_temperature`` (trainer/logit_kl.py), with the clean side from the cached compact logits,
   or from a clean pass when the cache has none; and ``block_mse_weight × Σ_l MSE_l`` between the
   clean and spliced ``blocks.{l}.hook_resid_post`` for each ``l`` of ``block_mse_layers``
   (default: every layer after the splice), in the SAE's scaled output units (raw × its output
   scale, like the reconstruction MSE), mean over train-mask tokens and model dimensions; the clean
   residuals come from a clean pass started at the same point, without grad.

**Memory.** The live pass runs the batch's sequences in micro-batches (``micro_batch_sequences``,
by default sized so one micro-batch's logits stay under ``max_logit_elements``). Each
micro-batch's end-to-end loss is back-propagated at once into a detached copy of the spliced
values, and its graph is freed; the accumulated gradient then enters the returned loss through
``((patch − patch.detach()) · grad).sum()`` — zero in value, exact in gradient. So the model's
logits never exist for the whole batch and the loss the trainer backpropagates is the true sum.

**Frozen model.** The objective puts the model in eval mode and turns off ``requires_grad`` on
all its parameters; only the SAE receives gradients.

**KL scale** ``s``: 1 with ``logit_kl_scale: fixed``; with ``mse`` it is MSE_0 / KL_0, the SAE's
reconstruction MSE and the KL measured (without grad) on the first batch this objective trains
on, and then kept (it is part of the objective's checkpointed state), so ``logit_kl_weight`` is
relative to the MSE and carries over between models, layers and SAE widths.

**Balanced** (``logit_kl_scale: balanced``, the recipe of Karvonen 2025): the scale is measured
again on every step, ``α = (R / KL).detach()``, with R the SAE's reconstruction term
(unweighted, as in its training forward) and KL the training KL, **both over the whole step**:
every train-mask token of the batch, all activation chunks and all live micro-batches together
(not per micro-batch: the micro-batches only bound memory, so the step's loss and gradient do
not depend on how it is cut). Since the KL is known only after the last micro-batch, the KL
gradient is accumulated at weight 1 and scaled by α afterwards (the loss is linear in it). The
step's loss is ``0.5 × (SAE's own terms + logit_kl_weight × α × KL + block-MSE term)``: with
weight 1 the KL and the reconstruction count equally in value on every step, and α carries no
gradient (it is a measured constant of the step). The step reports α as ``kl_alpha``.

Norm outliers (``TrainingConfig.outlier_policy``, cap from the initialisation tokens' input
norms as in ``LocalObjective``): ``drop`` leaves those tokens out of the splice (they keep clean
values) and out of every loss; ``clip`` clips the SAE's input, while its output still replaces
the token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from activation_cache import UserError, progress_bar

from .errors import NonFiniteActivationError
from .evaluators.reconstruction import evaluate_reconstruction
from .logit_kl import CompactClean, kl_from_logits, next_token_mask, next_token_nll
from .objective import (LocalObjective, Objective, StepOutput, noop_step,
                        weighted_sae_loss)
from .saes.base import SAE
from .sources import TokenBatch
from .splice import SpliceSite, splice_site, spliced_forward
from .training_config import TrainingConfig

DEFAULT_MAX_LOGIT_ELEMENTS = 2**25
"""Default bound on one micro-batch's logits (sequences × positions × vocabulary): 128 MiB fp32."""


class EndToEndDataError(UserError):
    """The cache cannot serve end-to-end training or evaluation (the message says what is missing)."""


# ------------------------------------------------------------------------------------------
# the data: whole windows of one cache split
# ------------------------------------------------------------------------------------------


class SequenceSource:
    """Whole windows of one split of an activation cache, for one SAE's input hook (and the
    output hook of a transcoder: ``target_hook``; None: the input hook).

    ``reader`` is an ``activation_cache.CacheReader`` (anything with its ``sequence_batches``,
    ``token_source``, ``d_in``, ``num_tokens``, ``num_sequences``, ``hooks``, ``stored_hooks``
    and ``manifest``). ``shuffle`` permutes the window order per (seed, epoch) for training.
    """

    def __init__(self, reader: Any, split: str, hook: str, *, target_hook: Optional[str] = None,
                 shuffle: bool = True):
        target_hook = hook if target_hook is None else target_hook
        for h in dict.fromkeys((hook, target_hook)):
            if h not in reader.hooks:
                raise EndToEndDataError(
                    f"cache {getattr(reader, 'uri', '')}: hook {h!r} is not cached (cached: "
                    f"{', '.join(reader.hooks)})")
        splits = reader.manifest.get("splits", {})
        if split not in splits:
            raise EndToEndDataError(f"cache {getattr(reader, 'uri', '')} has no {split!r} split "
                                    f"(it has {', '.join(splits) or 'none'})")
        self.reader, self.split, self.hook, self.shuffle = reader, split, hook, shuffle
        self.target_hook = target_hook
        """The hook the SAE reconstructs (and the splice replaces)."""
        self.d_in = int(reader.d_in(hook))
        self.d_out = int(reader.d_in(target_hook))
        self.num_tokens = int(reader.num_tokens(split))
        self.num_sequences = int(reader.num_sequences(split))
        self.has_logits = reader.manifest.get("logits") is not None
        self.stored_hooks = set(reader.stored_hooks)

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0,
                start_batch: int = 0) -> Iterator[Any]:
        """SequenceBatches of ``batch_size`` windows (deterministic for seed and epoch)."""
        return self.reader.sequence_batches(self.split, batch_size, start_batch=start_batch,
                                            seed=seed * 1_000_003 + epoch, shuffle=self.shuffle)

    def token_source(self) -> Any:
        """The same split as shuffled token rows (initialisation, threshold calibration)."""
        return self.reader.token_source(self.hook, self.split, target_hook=self.target_hook)

    def describe_inputs(self, site: SpliceSite) -> str:
        """Where a spliced pass starts with this cache (for messages)."""
        if site.is_resid_post:
            return f"block {site.layer + 1} (from the cached {site.hook_name})"
        if site.residual_name in self.stored_hooks:
            return f"block {site.layer} (from the cached {site.residual_name})"
        return "the embeddings (the cache holds no splice residual: full forward)"


class _WindowTokens:
    """The train-mask rows of the first ``max_sequences`` windows, in order, as an
    ActivationSource of ``TokenBatch(input, target)`` (so reconstruction metrics use exactly
    the tokens the splice saw)."""

    def __init__(self, source: SequenceSource, batch_size: int, max_sequences: int):
        self.source, self.batch_size, self.max_sequences = source, batch_size, max_sequences
        self.d_in, self.d_out = source.d_in, source.d_out
        self.num_tokens = source.num_tokens

    def iter_batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0,
                     start_batch: int = 0) -> Iterator[TokenBatch]:
        hooks = list(dict.fromkeys((self.source.hook, self.source.target_hook)))
        carry: list[list[Tensor]] = [[] for _ in hooks]
        held, seen, skip = 0, 0, start_batch

        def make(rows: list[Tensor]) -> TokenBatch:
            return TokenBatch(rows[0], rows[-1])

        for batch in self.source.batches(self.batch_size):
            if seen >= self.max_sequences:
                break
            n = min(len(batch), self.max_sequences - seen)
            seen += n
            mask = batch.train_mask[:n].bool()
            for h, hook in enumerate(hooks):
                carry[h].append(batch.acts[hook][:n][mask])
            held += int(mask.sum())
            while held >= batch_size:
                flats = [torch.cat(c) for c in carry]
                carry = [[f[batch_size:]] for f in flats]
                held = flats[0].shape[0] - batch_size
                if skip:
                    skip -= 1
                else:
                    yield make([f[:batch_size] for f in flats])
        if held and not skip:
            yield make([torch.cat(c) for c in carry])


# ------------------------------------------------------------------------------------------
# the objective
# ------------------------------------------------------------------------------------------


@dataclass
class _Accum:
    """Sums over tokens for the evaluation metrics."""

    kl: float = 0.0
    kl_n: int = 0
    top1: float = 0.0
    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    ce_n: int = 0
    block: float = 0.0


class EndToEndObjective(Objective):
    """KL / block-MSE through the spliced model, plus the SAE's own terms (module docstring).

    ``model``: the frozen HookedTransformer the cache was built from (``activation_cache.
    load_model`` of the manifest's model spec). ``kl_temperature`` (default:
    ``config.logit_kl_temperature``) divides both distributions' logits in the KL training term
    (evaluation's ``kl_div`` is always at temperature 1).
    ``micro_batch_sequences``: sequences per live pass (None: sized by ``max_logit_elements``).
    """

    def __init__(self, model: Any, config: TrainingConfig, *, kl_temperature: Optional[float] = None,
                 micro_batch_sequences: Optional[int] = None,
                 max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS):
        super().__init__(config)
        if kl_temperature is None:
            kl_temperature = config.logit_kl_temperature
        if not (math.isfinite(kl_temperature) and kl_temperature > 0):
            raise ValueError(f"kl_temperature must be > 0, got {kl_temperature}")
        if micro_batch_sequences is not None and micro_batch_sequences < 1:
            raise ValueError(f"micro_batch_sequences must be >= 1, got {micro_batch_sequences}")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.kl_temperature = float(kl_temperature)
        self.micro_batch_sequences = micro_batch_sequences
        self.max_logit_elements = int(max_logit_elements)
        self.local = LocalObjective(config)
        self.device = next(model.parameters()).device
        self.kl_scale: Optional[float] = None
        """MSE_0 / KL_0 once measured (``logit_kl_scale: mse``); None: 1."""

    # -- seam hooks -------------------------------------------------------------------------
    def iter_batches(self, source: SequenceSource, *, epoch: int, start_batch: int) -> Iterator[Any]:
        return source.batches(self.config.batch_size, seed=self.config.seed, epoch=epoch,
                              start_batch=start_batch)

    def steps_per_epoch(self, source: SequenceSource) -> int:
        return max(1, math.ceil(source.num_sequences / self.config.batch_size))

    def batch_tokens(self, batch: Any) -> int:
        return int(batch.train_mask.sum())

    def tokens_per_step(self, source: SequenceSource) -> float:
        """Mean train-mask tokens per batch of ``batch_size`` windows (sizes the schedule)."""
        return source.num_tokens / self.steps_per_epoch(source)

    def initialize(self, sae: SAE, source: SequenceSource, *, init_weights: bool = True) -> None:
        """Input scale, b_dec and the outlier cap from the split's tokens (as LocalObjective)."""
        self.local.initialize(sae, source.token_source(), init_weights=init_weights)

    def calibration_batches(self, train_source: SequenceSource) -> Iterator[Tensor]:
        """The training split's tokens in their own order (as LocalObjective's)."""
        return self.local.calibration_batches(train_source.token_source())

    def state_dict(self) -> dict[str, Any]:
        return {**self.local.state_dict(), "kl_scale": self.kl_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local.load_state_dict(state)
        self.kl_scale = state.get("kl_scale")

    @property
    def kl_factor(self) -> float:
        """``logit_kl_weight`` x the KL scale (module docstring)."""
        return self.config.logit_kl_weight * (1.0 if self.kl_scale is None else self.kl_scale)

    # -- helpers -----------------------------------------------------------------------------
    def site(self, sae: SAE) -> SpliceSite:
        """Where the SAE's output is spliced in: its output hook (an SAE: its own hook)."""
        return splice_site(str(sae.cfg.hook_spec_out), int(self.model.cfg.n_layers))

    def describe(self, source: SequenceSource) -> str:
        """One line saying what the end-to-end terms are and where the live passes start."""
        site = splice_site(source.target_hook, int(self.model.cfg.n_layers))
        parts = []
        if self.config.use_logit_kl:
            clean = ("cached compact clean logits" if source.has_logits
                     else "a clean pass per batch (the cache stores no logits)")
            scale = {"fixed": "", "mse": " (relative to the first batch's MSE)",
                     "balanced": " (balanced against the MSE every step)"}[
                self.config.logit_kl_scale]
            parts.append(f"KL(clean || spliced) x {self.config.logit_kl_weight}{scale} from "
                         f"{clean}")
        layers = self.block_layers(site)
        if layers:
            parts.append(f"block-MSE x {self.config.block_mse_weight} at layers {layers}")
        return (f"end-to-end: {'; '.join(parts)}; live passes start at "
                f"{source.describe_inputs(site)}")

    def block_layers(self, site: SpliceSite) -> list[int]:
        """Layers whose resid_post enters block-MSE (validated against the splice point)."""
        if not self.config.use_block_mse:
            return []
        layers = self.config.block_mse_layers
        if layers is None:
            layers = site.downstream_layers()
        bad = [l for l in layers if not site.first_affected_resid_post <= l < site.n_layers]
        if bad:
            raise EndToEndDataError(
                f"TrainingConfig.block_mse_layers: {bad} not downstream of the splice at "
                f"{site.hook_name} (allowed: {site.first_affected_resid_post}.."
                f"{site.n_layers - 1})")
        if not layers and not self.config.use_logit_kl:
            raise EndToEndDataError(
                f"TrainingConfig.use_block_mse: no block follows the splice at {site.hook_name} "
                "(the model's last block) and use_logit_kl is false, so there is no end-to-end "
                "term; set use_logit_kl: true or use_end_to_end: false")
        return sorted(set(layers))

    def _micro(self, batch: Any) -> int:
        if self.micro_batch_sequences is not None:
            return self.micro_batch_sequences
        per_seq = int(batch.tokens.shape[1]) * int(self.model.cfg.d_vocab)
        return max(1, self.max_logit_elements // max(per_seq, 1))

    @staticmethod
    def _pass_inputs(batch: Any, site: SpliceSite, sl: slice) -> dict[str, Tensor]:
        """The cheapest start for a live pass over sequences ``sl`` (see trainer/splice.py)."""
        kw: dict[str, Tensor] = {"attention_mask": batch.attention_mask[sl].long()}
        if site.is_resid_post and site.hook_name in batch.acts:
            kw["hook_value"] = batch.acts[site.hook_name][sl]
        elif site.residual_name in batch.acts:
            kw["resid_pre"] = batch.acts[site.residual_name][sl]
        else:
            kw["tokens"] = batch.tokens[sl]
        return kw

    def _mask(self, batch: Any, x: Tensor) -> Tensor:
        mask = batch.train_mask.bool()
        cap = self.local.outlier_cap
        if cap is not None and self.config.outlier_policy == "drop":
            mask = mask & (x.norm(dim=-1) <= cap)
        return mask

    def _hook_acts(self, batch: Any, sae: SAE) -> tuple[Tensor, Tensor]:
        """The windows' activations at the SAE's input hook and at its output hook (the same
        tensor for an SAE)."""
        found = []
        for hook in (str(sae.cfg.hook_spec), str(sae.cfg.hook_spec_out)):
            if hook not in batch.acts:
                raise EndToEndDataError(f"the sequence batches hold no activations for the "
                                        f"SAE's hook {hook!r} (they have "
                                        f"{', '.join(batch.acts)})")
            found.append(batch.acts[hook])
        return found[0], found[1]

    # -- the step ----------------------------------------------------------------------------
    def step(self, sae: SAE, batch: Any) -> StepOutput:
        cfg = self.config
        if not cfg.use_end_to_end:
            raise ValueError("EndToEndObjective needs TrainingConfig.use_end_to_end: true")
        batch = batch.to(self.device)
        x, y = self._hook_acts(batch, sae)
        mask = self._mask(batch, x)
        rows = x[mask]
        targets = rows if y is x else y[mask]
        for what in (rows,) if targets is rows else (rows, targets):
            if not bool(torch.isfinite(what).all()):
                bad = int((~torch.isfinite(what)).any(dim=-1).sum())
                raise NonFiniteActivationError(f"{bad} of {what.shape[0]} train-mask activation "
                                               "rows contain NaN or inf; not training on them")
        n_tok = rows.shape[0]
        if n_tok == 0:  # nothing to train on in this batch: a no-op step
            return noop_step(sae)
        pairs = TokenBatch(rows, targets)
        if cfg.outlier_policy == "clip" and self.local.outlier_cap is not None:
            pairs = self.local._apply_outlier_policy(pairs)

        # 1. the SAE's own terms, chunked by activation_batch_size sequences
        per_seq = mask.sum(1).tolist()
        loss = torch.zeros((), device=rows.device)
        stats: dict[str, Any] = {}
        x_hats: list[Tensor] = []
        fired: Optional[Tensor] = None
        running: dict[str, Tensor] = {}
        recon = torch.zeros((), device=rows.device)  # the step's reconstruction term R
        start = 0
        for a in range(0, len(per_seq), cfg.activation_batch_size):
            n = int(sum(per_seq[a:a + cfg.activation_batch_size]))
            if n == 0:
                continue
            chunk = pairs.rows(slice(start, start + n))
            out = sae.training_forward(chunk.input, chunk.target)
            start += n
            part, part_stats = weighted_sae_loss(cfg, out)
            loss = loss + part * (n / n_tok)
            for key, value in part_stats.items():
                stats[key] = stats.get(key, 0.0) + value * (n / n_tok)
            x_hats.append(out.output)
            fired = out.fired if fired is None else fired | out.fired
            running = sae.merge_running(running, out.running)
            recon = recon + out.reconstruction_loss * (n / n_tok)
        x_hat_raw = sae.unscale_output(torch.cat(x_hats).float())
        if (cfg.logit_kl_scale == "mse" and cfg.use_logit_kl and self.kl_scale is None):
            self._measure_kl_scale(sae, batch, y, mask, x_hat_raw, stats, n_tok)

        # 2-3. splice and end-to-end terms at the output hook, micro-batch by micro-batch
        patch = torch.zeros_like(y).masked_scatter(mask[..., None], x_hat_raw.to(y.dtype))
        balanced = cfg.use_logit_kl and cfg.logit_kl_scale == "balanced"
        if not balanced:
            e2e_value, grad, e2e_stats = self._live_losses(sae, batch, patch.detach(), mask,
                                                           n_tok)
            stats.update(e2e_stats)
            loss = loss + e2e_value
            if grad is not None:
                loss = loss + ((patch - patch.detach()) * grad).sum()
            return StepOutput(loss, stats, fired, running)
        # balanced: the KL's gradient at weight 1, then α from the whole step's R and KL
        kl_grad, block_value, block_grad, e2e_stats = self._live_losses(
            sae, batch, patch.detach(), mask, n_tok, split_kl=True)
        stats.update(e2e_stats)
        kl = e2e_stats["kl"]
        alpha = (recon / kl.clamp_min(1e-12)).detach()
        stats["kl_alpha"] = alpha
        kl_weight = cfg.logit_kl_weight * alpha
        loss = loss + kl_weight * kl + block_value
        grad = kl_weight * kl_grad if kl_grad is not None else None
        if block_grad is not None:
            grad = block_grad if grad is None else grad + block_grad
        if grad is not None:
            loss = loss + ((patch - patch.detach()) * grad).sum()
        return StepOutput(0.5 * loss, stats, fired, running)

    def _measure_kl_scale(self, sae: SAE, batch: Any, x: Tensor, mask: Tensor,
                          x_hat_raw: Tensor, stats: dict[str, Any], n_tok: int) -> None:
        """``logit_kl_scale: mse``: fix s = MSE_0 / KL_0 on this (the first) batch."""
        with torch.no_grad():
            patch = torch.zeros_like(x).masked_scatter(mask[..., None],
                                                       x_hat_raw.detach().to(x.dtype))
            _, _, live = self._live_losses(sae, batch, patch, mask, n_tok)
        mse0, kl0 = float(stats["mse"]), float(live.get("kl", 0.0))
        self.kl_scale = mse0 / kl0 if kl0 > 1e-12 and mse0 > 0 else 1.0

    def _live_losses(self, sae: SAE, batch: Any, patch: Tensor, mask: Tensor, n_tok: int,
                     *, split_kl: bool = False) -> Any:
        """E2E loss value, its gradient w.r.t. ``patch`` (None without grad) and stats.

        ``split_kl`` (``logit_kl_scale: balanced``): the KL and the block-MSE apart, as
        ``(KL gradient at weight 1, block-MSE value, block-MSE gradient, stats)``, so the
        caller can weight the KL by a scale known only after the last micro-batch."""
        cfg = self.config
        site = self.site(sae)
        layers = self.block_layers(site)
        use_kl = cfg.use_logit_kl
        cached = batch.clean_topk_logprobs is not None and cfg.logit_kl_clean == "cached"
        need_clean_logits = use_kl and not cached
        scale = float(sae.output_scaling())
        leaf = patch.requires_grad_(torch.is_grad_enabled())
        kl_sum = torch.zeros((), device=patch.device)
        block_sum = torch.zeros((), device=patch.device)
        kl_grad: Optional[Tensor] = None
        block_grad: Optional[Tensor] = None
        kl_factor = 1.0 if split_kl else self.kl_factor
        mb = self._micro(batch)
        for a in range(0, patch.shape[0], mb):
            sl = slice(a, a + mb)
            m = mask[sl]
            if not bool(m.any()):
                continue
            kw = self._pass_inputs(batch, site, sl)
            clean = None
            if layers or need_clean_logits:
                with torch.no_grad():
                    clean = spliced_forward(self.model, site, patch=None, mask=None,
                                            capture_layers=layers,
                                            need_logits=need_clean_logits, **kw)
            out = spliced_forward(self.model, site, patch=leaf[sl], mask=m,
                                  capture_layers=layers, need_logits=use_kl, **kw)
            part = torch.zeros((), device=patch.device)
            if use_kl:
                compact = None if not cached else CompactClean(
                    batch.clean_topk_logprobs[sl], batch.clean_topk_indices[sl])
                kl = kl_from_logits(out.logits[m],
                                    clean_logits=None if cached else clean.logits[m],
                                    compact=None if compact is None else CompactClean(
                                        compact.topk_logprobs[m], compact.topk_indices[m]),
                                    temperature=self.kl_temperature).sum()
                part = part + kl_factor * kl / n_tok
                kl_sum = kl_sum + kl.detach()
            block_part = torch.zeros((), device=patch.device)
            for layer in layers:
                diff = (out.resid_post[layer] - clean.resid_post[layer])[m] * scale
                sq = diff.pow(2).mean(-1).sum()
                block_part = block_part + cfg.block_mse_weight * sq / n_tok
                block_sum = block_sum + sq.detach()
            if not leaf.requires_grad:
                continue
            if not split_kl:
                (part + block_part).backward()
                continue
            if use_kl:
                g = torch.autograd.grad(part, leaf, retain_graph=bool(layers))[0]
                kl_grad = g if kl_grad is None else kl_grad + g
            if layers:
                g = torch.autograd.grad(block_part, leaf)[0]
                block_grad = g if block_grad is None else block_grad + g
        block_value = cfg.block_mse_weight * block_sum / n_tok
        stats: dict[str, Any] = {}
        if use_kl:
            stats["kl"] = kl_sum / n_tok
        if layers:
            stats["block_mse"] = block_sum / n_tok
        if split_kl:
            return kl_grad, block_value, block_grad, stats
        value = kl_factor * kl_sum / n_tok + block_value
        grad = leaf.grad if leaf.requires_grad else None
        return value, grad, stats

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, sae: SAE, val_source: SequenceSource, max_tokens: Optional[int]
                 ) -> dict[str, Any]:
        """Reconstruction metrics plus ce_loss_clean / spliced / zero_ablation / delta / score,
        kl_div (clean ‖ spliced, temperature 1) and top1_agreement on ``val_source``, over whole
        windows until ``max_tokens`` train-mask tokens are covered (None: the whole split).

        CE counts positions on the train mask whose next token is real; KL and top-1 count every
        train-mask position. The spliced SAE uses its shipped (inference) encoding: pass the
        model you would ship (the training loop passes a calibrated copy).
        ``block_mse`` is reported when ``use_block_mse`` is on.
        """
        site = self.site(sae)
        layers = self.block_layers(site)
        acc = _Accum()
        n_seq, n_tok = 0, 0
        total = val_source.num_tokens if max_tokens is None else min(max_tokens,
                                                                      val_source.num_tokens)
        bar = progress_bar(total, desc="e2e eval", unit="tok", leave=False,
                           disable=not self.config.show_progress, lines_off_terminal=False)
        for batch in val_source.batches(self.config.batch_size):
            batch = batch.to(self.device)
            x, y = self._hook_acts(batch, sae)
            mask = batch.train_mask.bool()
            rows = x[mask]
            if rows.shape[0]:
                x_hat = sae(rows)[0].float()
                patch = torch.zeros_like(y).masked_scatter(mask[..., None], x_hat.to(y.dtype))
                self._eval_batch(sae, batch, site, layers, patch, mask, acc)
            n_seq += len(batch)
            n_tok += rows.shape[0]
            bar.update(min(rows.shape[0], max(total - bar.n, 0)))
            if max_tokens is not None and n_tok >= max_tokens:
                break
        bar.close()
        if n_tok == 0:
            return {}
        metrics = evaluate_reconstruction(
            sae, _WindowTokens(val_source, self.config.batch_size, n_seq), max_tokens=None,
            batch_tokens=self.config.train_batch_tokens)
        metrics.update(_e2e_metrics(acc, layers))
        return metrics

    def _eval_batch(self, sae: SAE, batch: Any, site: SpliceSite, layers: list[int],
                    patch: Tensor, mask: Tensor, acc: _Accum) -> None:
        cached = batch.clean_topk_logprobs is not None
        scale = float(sae.output_scaling())
        ce_pos_all = next_token_mask(mask, batch.attention_mask)
        for a in range(0, patch.shape[0], self._micro(batch)):
            sl = slice(a, a + self._micro(batch))
            m, ce_pos = mask[sl], ce_pos_all[sl]
            if not bool(m.any()):
                continue
            kw = self._pass_inputs(batch, site, sl)
            tokens = batch.tokens[sl]
            clean = None
            if layers or not cached:
                clean = spliced_forward(self.model, site, patch=None, mask=None,
                                        capture_layers=layers, need_logits=not cached, **kw)
            spliced = spliced_forward(self.model, site, patch=patch[sl], mask=m,
                                      capture_layers=layers, **kw)
            zero = spliced_forward(self.model, site, patch=torch.zeros_like(patch[sl]), mask=m,
                                   **kw)
            if cached:
                compact = CompactClean(batch.clean_topk_logprobs[sl][m],
                                       batch.clean_topk_indices[sl][m])
                kl = kl_from_logits(spliced.logits[m], compact=compact)
                top_clean = compact.topk_indices.gather(
                    -1, compact.topk_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
                ce_clean = -batch.clean_next_token_logprob[sl][ce_pos]
            else:
                kl = kl_from_logits(spliced.logits[m], clean_logits=clean.logits[m])
                top_clean = clean.logits[m].argmax(-1)
                ce_clean = next_token_nll(clean.logits, tokens)[ce_pos]
            acc.kl += float(kl.double().sum())
            acc.kl_n += int(m.sum())
            acc.top1 += float((spliced.logits[m].argmax(-1) == top_clean).sum())
            acc.ce_clean += float(ce_clean.double().sum())
            acc.ce_spliced += float(next_token_nll(spliced.logits, tokens)[ce_pos].double().sum())
            acc.ce_zero += float(next_token_nll(zero.logits, tokens)[ce_pos].double().sum())
            acc.ce_n += int(ce_pos.sum())
            for layer in layers:
                diff = (spliced.resid_post[layer] - clean.resid_post[layer])[m] * scale
                acc.block += float(diff.double().pow(2).mean(-1).sum())


def _e2e_metrics(acc: _Accum, layers: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if acc.kl_n:
        out["kl_div"] = acc.kl / acc.kl_n
        out["top1_agreement"] = acc.top1 / acc.kl_n
        if layers:
            out["block_mse"] = acc.block / acc.kl_n
    if acc.ce_n:
        clean, spliced, zero = (acc.ce_clean / acc.ce_n, acc.ce_spliced / acc.ce_n,
                                acc.ce_zero / acc.ce_n)
        out.update(ce_loss_clean=clean, ce_loss_spliced=spliced, ce_loss_zero_ablation=zero,
                   ce_loss_delta=spliced - clean)
        out["ce_loss_score"] = (zero - spliced) / (zero - clean) if zero != clean else None
    return out


# ------------------------------------------------------------------------------------------
# wiring: the model of a cache, and the sources/objective of an end-to-end job
# ------------------------------------------------------------------------------------------


_LOADED_MODEL: dict[str, Any] = {}
"""The model this process loaded last, by its spec: a sweep's worker runs its trials one after
another (Ray Tune reuses the actor), and each trial would otherwise load the same model again."""


def load_cache_model(reader: Any, *, reuse: bool = True) -> Any:
    """Load the model a cache was built from (its manifest's ModelSpec) and check that it is the
    same model (identity and fingerprint), so the splice never runs against another model.

    ``reuse``: the model this process loaded last for the same spec is returned again (it is
    frozen and in eval mode; the splice only adds hooks for one call), still identity-checked
    against this cache. One model is kept at a time."""
    import json

    from activation_cache import ModelSpec, load_model, model_identity

    if reader.manifest.get("synthetic"):
        raise EndToEndDataError(f"cache {getattr(reader, 'uri', '')} is synthetic (generated "
                                "activations, no model): end-to-end training and CE/KL need a "
                                "model's cache")
    spec_dict = reader.manifest.get("config", {}).get("model")
    if spec_dict is None:
        raise EndToEndDataError(f"cache {getattr(reader, 'uri', '')}: its manifest records no "
                                "model spec (config.model); rebuild it with `sae-sweep cache`")
    spec = ModelSpec.from_dict(spec_dict)
    key = json.dumps(spec.to_dict(), sort_keys=True, default=str)
    model = _LOADED_MODEL.get(key) if reuse else None
    if model is None:
        _LOADED_MODEL.clear()  # never two models held at once
        model = load_model(spec)
        _LOADED_MODEL[key] = model
    reader.check_model(model_identity(model, spec))
    return model
