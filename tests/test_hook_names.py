"""The hook-name grammar (activation_cache/hook_names.py), and the hooks a transcoder reads: the
MLP's input (``blocks.L.ln2.hook_normalized``) and output (``blocks.L.hook_mlp_out``)."""

import pytest
import torch

from activation_cache import (BlockHook, CacheConfig, CacheInputError, CorpusSpec, HookNameError,
                              ModelSpec, block_hook_name, build_cache, check_hook_name,
                              load_model, open_cache, parse_block_hook, resolve_hook)
from activation_cache.hook_names import FLAGGED_POINTS, active_hook_names
from activation_cache.model_loading import config_hook_names

MLP_IN, MLP_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model(ModelSpec(source="tiny"))


def _fired(model, n_tokens=3):
    """The hook names that actually receive a value in a forward pass."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(torch.zeros(1, n_tokens, dtype=torch.long))
    return set(cache.keys())


def test_block_hooks_parse_and_build_both_ways():
    b = parse_block_hook("blocks.12.ln2.hook_normalized")
    assert b == BlockHook(12, "ln2.hook_normalized") and b.name == "blocks.12.ln2.hook_normalized"
    assert (b.resid_pre, b.resid_post) == ("blocks.12.hook_resid_pre", "blocks.12.hook_resid_post")
    assert not b.is_resid_post and parse_block_hook("blocks.3.hook_resid_post").is_resid_post
    assert parse_block_hook("blocks.0.attn.hook_z") == BlockHook(0, "attn.hook_z")
    for outside in ("hook_embed", "ln_final.hook_normalized", "blocks.x.hook_mlp_out",
                    "resid_post.6", "blocks.6", "", None):
        assert parse_block_hook(outside) is None
    assert block_hook_name(6, "hook_mlp_out") == "blocks.6.hook_mlp_out"
    assert parse_block_hook(block_hook_name(29, "mlp.hook_post")) == BlockHook(29, "mlp.hook_post")


def test_the_names_checked_before_loading_are_exactly_the_hooks_that_fire(tiny):
    names, n_layers = config_hook_names(ModelSpec(source="tiny"))
    assert n_layers == 2
    assert set(names) == _fired(tiny) == set(active_hook_names(tiny.hook_dict, tiny.cfg))
    assert {MLP_IN, MLP_OUT, "blocks.0.ln2.hook_normalized"} <= set(names)
    assert "blocks.1.hook_mlp_in" in tiny.hook_dict and "blocks.1.hook_mlp_in" not in names


def test_the_mlp_input_hook_times_the_norm_gain_is_what_the_mlp_reads(tiny):
    with torch.inference_mode():
        _, cache = tiny.run_with_cache(torch.arange(3, 12)[None], names_filter=[MLP_IN, MLP_OUT])
        block = tiny.blocks[1]
        assert torch.allclose(block.mlp(cache[MLP_IN] * block.ln2.w), cache[MLP_OUT], atol=1e-6)


@pytest.mark.parametrize("hook", ["blocks.1.hook_mlp_in", "mlp_in.1", "1.mlp_in"])
def test_a_hook_that_never_fires_is_refused_with_what_to_use(tiny, hook):
    names, n_layers = config_hook_names(ModelSpec(source="tiny"))
    with pytest.raises(HookNameError) as err:
        check_hook_name(hook, names, n_layers)
    msg = str(err.value)
    assert "never fires" in msg and "use_hook_mlp_in" in msg and "\n" not in msg
    assert "blocks.1.ln2.hook_normalized (the MLP's input normalised" in msg
    assert "blocks.1.hook_resid_mid (before the norm)" in msg
    with pytest.raises(HookNameError, match="never fires"):
        resolve_hook(tiny, hook)


def test_the_other_flagged_points_never_fire_either(tiny):
    """FLAGGED_POINTS is the list of hook points a model loaded with the flags off never runs."""
    silent = set(tiny.hook_dict) - _fired(tiny)
    assert {parse_block_hook(n).point for n in silent} == set(FLAGGED_POINTS)


def test_friendly_forms_with_digits_in_the_point(tiny):
    assert resolve_hook(tiny, "1.ln2.hook_normalized") == MLP_IN
    assert resolve_hook(tiny, "ln2.hook_normalized.1") == MLP_IN
    assert resolve_hook(tiny, "mlp_out.1") == MLP_OUT
    assert resolve_hook(tiny, "L1 mlp_out") == MLP_OUT
    assert resolve_hook(tiny, "mlp_out1") == MLP_OUT     # a trailing number is the layer
    names, n_layers = config_hook_names(ModelSpec(source="tiny"))
    with pytest.raises(HookNameError, match=r"did you mean blocks\.1\.ln2\.hook_normalized\?"):
        check_hook_name("ln2.hook_normalized.-1", names, n_layers)
    names, n_layers = config_hook_names(ModelSpec(source="tiny", tiny_n_layers=13))
    with pytest.raises(HookNameError, match=r"did you mean blocks\.12\.hook_mlp_out\?"):
        check_hook_name("mlp_out12", names, n_layers)   # not layer 2 of "mlp_out1"


def test_transcoder_hooks_pass_the_checks_before_loading_and_are_stored(tmp_path, one_thread,
                                                                         monkeypatch):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"d{i}.txt").write_text(f"text {i}: now is the winter of our discontent " * 3)
    cfg = CacheConfig(output=str(tmp_path / "cache"), model=ModelSpec(source="tiny"),
                      corpus=CorpusSpec(source="files", paths=(str(folder),)),
                      hooks=(MLP_IN, MLP_OUT), max_text_length=32, dtype="float32",
                      store_splice_residual=True, val_fraction=0.0, test_fraction=0.0)
    import activation_cache.builder as builder

    # a hook that never fires is refused before the model loads
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as patch:
        patch.setattr(builder, "load_model", refuse)
        with pytest.raises(CacheInputError, match=r"^CacheConfig\.hooks: 'blocks\.1\.hook_mlp_in' "
                                                  r"never fires"):
            build_cache(cfg.replace(hooks=("blocks.1.hook_mlp_in",)))
        builder.check_hooks_from_config(cfg)  # the transcoder's hooks pass
    reader = open_cache(build_cache(cfg))
    m = reader.manifest
    assert m["hooks"] == [MLP_IN, MLP_OUT]
    assert m["stored_hooks"] == [MLP_IN, MLP_OUT, "blocks.1.hook_resid_pre"]
    assert m["splice_hooks"] == {MLP_IN: "blocks.1.hook_resid_pre",
                                 MLP_OUT: "blocks.1.hook_resid_pre"}
    assert reader.d_in(MLP_IN) == reader.d_in(MLP_OUT) == 64
    model = load_model(cfg.model)
    for batch in reader.sequence_batches("train", 4):
        with torch.inference_mode():
            _, cache = model.run_with_cache(batch.tokens, names_filter=[MLP_IN, MLP_OUT],
                                            attention_mask=batch.attention_mask.long())
        for h in (MLP_IN, MLP_OUT):
            real = batch.attention_mask
            assert torch.allclose(batch.acts[h][real], cache[h][real], atol=1e-5), h


@pytest.mark.model
def test_smollm2_has_the_transcoder_hooks_as_transformer_lens_builds_it():
    torch.set_num_threads(1)
    names, n_layers = config_hook_names(ModelSpec())  # from the GGUF metadata, no weights
    assert n_layers == 30
    for layer in range(30):
        for point in ("ln2.hook_normalized", "hook_mlp_out"):
            check_hook_name(block_hook_name(layer, point), names, n_layers)
    assert "blocks.6.hook_mlp_in" not in names
    model = load_model(ModelSpec())
    assert set(names) == set(active_hook_names(model.hook_dict, model.cfg))
    hooks = ["blocks.6.ln2.hook_normalized", "blocks.6.hook_mlp_out"]
    with torch.inference_mode():
        _, cache = model.run_with_cache(torch.tensor([[1, 504, 3458, 314, 260]]),
                                        names_filter=hooks, stop_at_layer=7)
        assert cache[hooks[0]].shape == cache[hooks[1]].shape == (1, 5, 576)
        # the hook is the normalised residual before ln2's gain (no weight processing: the gain
        # is not folded into the MLP), so the MLP reads it times blocks.6.ln2.w
        block = model.blocks[6]
        assert torch.allclose(block.mlp(cache[hooks[0]] * block.ln2.w), cache[hooks[1]], atol=1e-4)
        assert not torch.allclose(block.mlp(cache[hooks[0]]), cache[hooks[1]], atol=1e-2)
