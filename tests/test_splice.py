"""The splice (trainer/splice.py): restarted passes equal the full hooked forward."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from trainer.splice import SpliceError, patch_values, splice_site, spliced_forward

N_LAYERS = 3


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS, d_model=16, n_ctx=12, d_head=4, n_heads=4, d_mlp=32, d_vocab=40,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        gated_mlp=True, seed=0,
    )
    m = HookedTransformer(cfg)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def batch(model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 40, (3, 12), generator=g)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0  # right padding
    train_mask = attention_mask.bool().clone()
    train_mask[:, 0] = False  # BOS excluded
    _, cache = model.run_with_cache(tokens, attention_mask=attention_mask)
    return tokens, attention_mask, train_mask, cache


HOOKS = ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_resid_mid",
         "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post", "blocks.0.hook_resid_pre",
         "blocks.2.hook_resid_post"]


@pytest.mark.parametrize("hook", HOOKS)
def test_restarted_pass_equals_full_hooked_forward(model, batch, hook):
    tokens, am, mask, cache = batch
    site = splice_site(hook, N_LAYERS)
    patch = torch.randn_like(cache[hook]) * 3
    common = dict(patch=patch, mask=mask, attention_mask=am, capture_layers=site.downstream_layers())
    full = spliced_forward(model, site, tokens=tokens, **common)
    restart = spliced_forward(model, site, resid_pre=cache[site.residual_name], **common)
    torch.testing.assert_close(restart.logits, full.logits, rtol=1e-5, atol=1e-5)
    assert set(restart.resid_post) == set(site.downstream_layers()) == set(full.resid_post)
    for layer, value in full.resid_post.items():
        torch.testing.assert_close(restart.resid_post[layer], value, rtol=1e-5, atol=1e-5)
    if site.is_resid_post:  # restart after the block from the hook's clean value
        after = spliced_forward(model, site, hook_value=cache[hook], **common)
        torch.testing.assert_close(after.logits, full.logits, rtol=1e-5, atol=1e-5)
    # the patch really changed the output on spliced tokens (the test can fail)
    clean = model(tokens, attention_mask=am)
    assert (full.logits - clean)[mask].abs().max() > 1e-2


def test_hooked_forward_matches_manual_patch_of_mlp_out(model, batch):
    """Independent check of the substitution for a non-residual hook: re-run the block by hand."""
    tokens, am, mask, cache = batch
    hook = "blocks.1.hook_mlp_out"
    site = splice_site(hook, N_LAYERS)
    patch = torch.randn_like(cache[hook])
    out = spliced_forward(model, site, patch=patch, mask=mask, tokens=tokens, attention_mask=am,
                          capture_layers=[1])
    expected = cache["blocks.1.hook_resid_mid"] + torch.where(mask[..., None], patch, cache[hook])
    torch.testing.assert_close(out.resid_post[1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out",
                                  "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"])
def test_identity_patch_gives_clean_logits(model, batch, hook):
    tokens, am, mask, cache = batch
    site = splice_site(hook, N_LAYERS)
    out = spliced_forward(model, site, patch=cache[hook].clone(), mask=mask,
                          resid_pre=cache[site.residual_name], hook_value=cache[hook],
                          attention_mask=am)
    clean = model(tokens, attention_mask=am)
    torch.testing.assert_close(out.logits, clean, rtol=1e-5, atol=1e-5)


def test_tokens_off_the_mask_keep_clean_values(model, batch):
    """Garbage (even NaN) in the patch at unmasked positions never reaches the output."""
    tokens, am, mask, cache = batch
    hook = "blocks.1.hook_resid_post"
    site = splice_site(hook, N_LAYERS)
    patch = torch.randn_like(cache[hook])
    a = spliced_forward(model, site, patch=patch, mask=mask, resid_pre=cache[site.residual_name],
                        attention_mask=am)
    poisoned = patch.clone()
    poisoned[~mask] = float("nan")
    b = spliced_forward(model, site, patch=poisoned, mask=mask,
                        resid_pre=cache[site.residual_name], attention_mask=am)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_stop_early_for_block_mse_only(model, batch):
    tokens, am, mask, cache = batch
    site = splice_site("blocks.0.hook_resid_post", N_LAYERS)
    patch = torch.randn_like(cache[site.hook_name])
    full = spliced_forward(model, site, patch=patch, mask=mask, tokens=tokens, attention_mask=am,
                           capture_layers=[1])
    short = spliced_forward(model, site, patch=patch, mask=mask, hook_value=cache[site.hook_name],
                            attention_mask=am, capture_layers=[1], need_logits=False)
    assert short.logits is None
    torch.testing.assert_close(short.resid_post[1], full.resid_post[1])


def test_patch_values_is_where_not_blend():
    clean = torch.tensor([[[1.0], [2.0]]])
    patch = torch.tensor([[[float("inf")], [5.0]]], requires_grad=True)
    mask = torch.tensor([[False, True]])
    out = patch_values(clean, patch, mask)
    assert out.tolist() == [[[1.0], [5.0]]]
    out.sum().backward()
    assert patch.grad.tolist() == [[[0.0], [1.0]]]


def test_bad_hooks_are_user_errors(model, batch):
    with pytest.raises(SpliceError, match="not inside a transformer block"):
        splice_site("hook_embed", N_LAYERS)
    with pytest.raises(SpliceError, match="outside the model's 3 blocks"):
        splice_site("blocks.3.hook_resid_post", N_LAYERS)
    site = splice_site("blocks.1.hook_resid_post", N_LAYERS)
    tokens, am, mask, cache = batch
    with pytest.raises(SpliceError, match="not downstream"):
        spliced_forward(model, site, patch=None, mask=None, tokens=tokens, capture_layers=[1])
