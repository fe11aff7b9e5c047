"""The splice: run a frozen model with one hook's activations replaced on chosen tokens.

An SAE spliced into a model replaces the activations at its hook with its reconstruction on the
tokens it trains on (the ``train_mask``); every other token (padding, BOS, excluded tokens) keeps
its clean value. This module runs "the rest of the model" after that replacement, as cheaply as
the available inputs allow:

* **restart at block L** (``resid_pre`` given: the cache stored ``blocks.{L}.hook_resid_pre``):
  ``model(resid_pre, start_at_layer=L)`` with a forward hook at the SAE's hook point that
  substitutes the patch. Because the substitution happens *inside* block L, the block's own later
  computation reads the substituted value, so this is exact for any hook inside block L:
  ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``,
  ``hook_resid_post``, ``attn.hook_z``... (The shortcut "residual after the block = clean
  residual − clean output + reconstruction" is exact for ``mlp_out`` and ``resid_post`` but not
  for ``attn_out``, whose change also alters the MLP input of the same block; we never use it.)
* **restart after block L** (the hook is ``blocks.{L}.hook_resid_post`` and its clean value is
  given): the patched residual *is* block L+1's input, so block L is not run at all.
* **full forward** (only tokens given): embeddings, all blocks, with the same hook.

All three give the same logits (to float tolerance; tests/test_splice.py). The model is never
modified: hooks are registered for one call and removed afterwards, also on error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from activation_cache import UserError, parse_block_hook


class SpliceError(UserError):
    """The SAE's hook cannot be spliced into this model (the message says why)."""


def residual_hook_name(layer: int) -> str:
    """Name of the block-``layer`` input residual, the point a restarted pass starts from."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_post_hook_name(layer: int) -> str:
    """Name of block ``layer``'s output residual (what block-MSE compares)."""
    return f"blocks.{layer}.hook_resid_post"


@dataclass(frozen=True)
class SpliceSite:
    """Where an SAE sits in a model: its hook name and the block that contains it."""

    hook_name: str  # e.g. "blocks.6.hook_resid_post"
    layer: int  # index of the block containing the hook
    n_layers: int  # number of blocks of the model

    @property
    def is_resid_post(self) -> bool:
        """True when the hook is the block's output residual (restart after the block)."""
        return self.hook_name == resid_post_hook_name(self.layer)

    @property
    def residual_name(self) -> str:
        """The cached residual a restarted pass starts from: ``blocks.{L}.hook_resid_pre``."""
        return residual_hook_name(self.layer)

    @property
    def first_affected_resid_post(self) -> int:
        """The first layer whose ``hook_resid_post`` the splice can change (and that is not the
        hook itself): L for hooks inside block L, L+1 for ``blocks.{L}.hook_resid_post``."""
        return self.layer + 1 if self.is_resid_post else self.layer

    def downstream_layers(self) -> list[int]:
        """Every layer whose output residual lies strictly after the splice (block-MSE default)."""
        return list(range(self.first_affected_resid_post, self.n_layers))


def splice_site(hook_name: str, n_layers: int) -> SpliceSite:
    """Parse ``blocks.{L}.<point>``; raise :class:`SpliceError` for hooks outside the blocks."""
    block = parse_block_hook(hook_name)
    if block is None:
        raise SpliceError(
            f"hook {hook_name!r} is not inside a transformer block (expected "
            "'blocks.{layer}.<hook point>'); end-to-end losses can only splice block hooks"
        )
    layer = block.layer
    if not 0 <= layer < n_layers:
        raise SpliceError(f"hook {hook_name!r}: layer {layer} is outside the model's "
                          f"{n_layers} blocks")
    return SpliceSite(hook_name, layer, n_layers)


@dataclass
class SpliceOutput:
    """What one spliced (or clean) pass returns."""

    logits: Optional[Tensor]  # [b, T, vocab], None when the pass stopped early
    resid_post: dict[int, Tensor] = field(default_factory=dict)  # layer -> [b, T, d_model]


def _mask_like(mask: Tensor, value: Tensor) -> Tensor:
    """Reshape a [b, T] mask so it broadcasts over a hook value [b, T, ...]."""
    return mask.reshape(mask.shape + (1,) * (value.dim() - mask.dim()))


def patch_values(clean: Tensor, patch: Tensor, mask: Tensor) -> Tensor:
    """``patch`` where ``mask`` is true, ``clean`` elsewhere (differentiable in ``patch``).

    ``torch.where`` (not a blend by multiplication) so that a NaN or inf in the unselected branch
    can never leak into the result or its gradient.
    """
    if patch.shape != clean.shape:
        raise SpliceError(f"the SAE's output has shape {tuple(patch.shape)} but the hook value "
                          f"has shape {tuple(clean.shape)}")
    return torch.where(_mask_like(mask, clean), patch.to(clean.dtype), clean)


def spliced_forward(
    model,
    site: SpliceSite,
    *,
    patch: Optional[Tensor],
    mask: Optional[Tensor],
    tokens: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    resid_pre: Optional[Tensor] = None,
    hook_value: Optional[Tensor] = None,
    capture_layers: Iterable[int] = (),
    need_logits: bool = True,
) -> SpliceOutput:
    """Run ``model`` with ``patch`` substituted at ``site`` on the tokens where ``mask`` is true.

    Inputs, cheapest first (the first one available is used):

    * ``hook_value`` — the clean value at the hook, used only when the hook is
      ``blocks.{L}.hook_resid_post``: the pass starts at block L+1;
    * ``resid_pre`` — the clean ``blocks.{L}.hook_resid_pre``: the pass starts at block L;
    * ``tokens`` — a full forward from the embeddings.

    ``patch=None`` runs the clean model from the same starting point (``mask`` is then ignored).
    ``capture_layers`` lists layers whose ``hook_resid_post`` is returned (with their autograd
    graph when ``patch`` requires grad); each must be at or after the first layer the splice
    affects. With ``need_logits=False`` the pass stops after the last captured layer and
    ``logits`` is None. ``attention_mask`` [b, T] (1 = real token) is passed to the model as is.
    """
    capture = sorted(set(int(c) for c in capture_layers))
    for layer in capture:
        if not site.first_affected_resid_post <= layer < site.n_layers:
            raise SpliceError(
                f"block-MSE layer {layer} is not downstream of the splice at {site.hook_name} "
                f"(allowed: {site.first_affected_resid_post}..{site.n_layers - 1})"
            )
    if patch is not None and mask is None:
        raise ValueError("spliced_forward: a patch needs a mask")
    stop = None
    if not need_logits:
        if not capture:
            raise ValueError("spliced_forward: need_logits=False with nothing to capture")
        stop = capture[-1] + 1

    hooks: list[tuple[str, Callable]] = []
    if site.is_resid_post and hook_value is not None:
        start = site.layer + 1
        x = hook_value if patch is None else patch_values(hook_value, patch, mask)
    elif resid_pre is not None:
        start = site.layer
        x = resid_pre
    elif tokens is not None:
        start = None
        x = tokens
    else:
        raise ValueError("spliced_forward: give tokens, resid_pre or (for resid_post) hook_value")

    if patch is not None and start != site.layer + 1:
        def substitute(value: Tensor, hook) -> Tensor:  # noqa: ARG001 - TransformerLens signature
            return patch_values(value, patch, mask)

        hooks.append((site.hook_name, substitute))

    captured: dict[int, Tensor] = {}
    for layer in capture:
        def keep(value: Tensor, hook, _layer: int = layer) -> None:  # noqa: ARG001
            captured[_layer] = value

        hooks.append((resid_post_hook_name(layer), keep))

    kwargs = {"attention_mask": attention_mask}
    if start is not None:
        kwargs["start_at_layer"] = start
    if stop is not None and (start is None or stop > start):
        kwargs["stop_at_layer"] = stop
    with model.hooks(fwd_hooks=hooks):
        out = model(x, return_type="logits" if need_logits else None, **kwargs)
    return SpliceOutput(out if need_logits else None, captured)
