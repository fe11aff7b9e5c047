"""Reading SAELens folders back: ``load_saelens`` gives our SAE with the same encode/decode (our
exports of every architecture, and SAELens's own saves), ``sae-sweep eval`` reads a SAELens
export like a native folder, and what we cannot represent is one clear line."""

from __future__ import annotations

import io
import json

import pytest
import torch

from trainer import (SAELensFormatError, architecture_names, build_sae, evaluate_sae_dir,
                     export_sae, field_catalog, load_sae_folder, load_saelens, make_sae_config)
from trainer.registry import saelens_readers

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(arch: str, d_in: int = 16, d_sae: int = 64, hook_layer: int = 1,
                  hook_name: str = "hook_resid_post"):
    """An SAE of ``arch`` with non-trivial weights, input scale, biases and thresholds."""
    catalog = field_catalog()
    options = {"top_k": 4} if "top_k" in catalog.owned[arch] else {}
    if arch in catalog.transcoders:
        options.update(hook_name_out="hook_mlp_out", d_out=d_in + 3)
    sae = build_sae(make_sae_config(d_in=d_in, d_sae=d_sae, architecture=arch,
                                    hook_layer=hook_layer, hook_name=hook_name, **options), seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, d_in, generator=g) * 20 + 2
    target = None
    if arch in catalog.transcoders:
        target = torch.randn(400, d_in + 3, generator=g) * 5 - 1
    sae.initialize_from_data(x, target)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
        if hasattr(sae, "threshold") and sae.threshold.numel() == d_sae:
            sae.threshold.copy_(torch.empty(d_sae).uniform_(0.05, 1.2, generator=g))
    if sae.needs_calibration:
        sae.calibrate(iter([x[:200]]), max_tokens=200)
    return sae.eval(), x[200:]


@pytest.mark.parametrize("arch", architecture_names())
def test_our_export_of_every_architecture_reads_back_with_the_same_outputs(tmp_path, arch):
    sae, x = _trained_like(arch)
    export_sae(sae, tmp_path / "export")
    exported_as = json.loads((tmp_path / "export" / "cfg.json").read_text())["architecture"]
    if exported_as not in saelens_readers():  # e.g. a transcoder: no class of ours reads it
        with pytest.raises(SAELensFormatError, match=f"SAELens architecture {exported_as!r} has "
                                                     "no sae-sweep equivalent") as err:
            load_saelens(tmp_path / "export")
        assert "\n" not in str(err.value)
        return
    back = load_saelens(tmp_path / "export")
    assert back.hook_spec == sae.hook_spec and back.cfg.d_sae == sae.cfg.d_sae
    ours, theirs = sae.encode(x), back.encode(x)
    assert torch.equal(ours > 0, theirs > 0)
    assert torch.allclose(ours, theirs, atol=1e-4 * (1 + float(ours.abs().max())))
    assert torch.allclose(sae.decode(ours), back.decode(theirs), atol=1e-3)
    assert float((ours > 0).sum(-1).float().mean()) > 0
    # native folders go through the same entry point
    sae.save(tmp_path / "native")
    native = load_sae_folder(tmp_path / "native").encode(x)  # folded: equal up to rounding
    assert torch.allclose(native, ours, atol=1e-4 * (1 + float(ours.abs().max())))


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_a_sae_lens_saved_sae_reads_back_with_sae_lens_outputs(tmp_path, kind):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes import (JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig,
                               TopKSAE, TopKSAEConfig)

    torch.manual_seed(0)
    common = dict(d_in=16, d_sae=48, dtype="float32", device="cpu",
                  apply_b_dec_to_input=(kind != "standard"))  # one without b_dec centring
    if kind == "standard":
        theirs = StandardSAE(StandardSAEConfig(**common))
    elif kind == "topk":
        theirs = TopKSAE(TopKSAEConfig(k=5, **common))
    else:
        theirs = JumpReLUSAE(JumpReLUSAEConfig(**common))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        if kind == "jumprelu":
            theirs.threshold.uniform_(0.05, 0.5)
    theirs.cfg.metadata.hook_name = "blocks.2.hook_mlp_out"
    theirs.save_model(tmp_path / "theirs")
    ours = load_saelens(tmp_path / "theirs")
    assert ours.hook_spec == "blocks.2.hook_mlp_out"
    x = torch.randn(300, 16) * 3
    with torch.no_grad():
        f_theirs, f_ours = theirs.encode(x), ours.encode(x)
        assert torch.equal(f_theirs > 0, f_ours > 0)
        assert torch.allclose(f_theirs, f_ours, atol=1e-5)
        assert torch.allclose(theirs.decode(f_theirs), ours.decode(f_ours), atol=1e-5)
    if kind == "topk":
        assert int((f_ours > 0).sum(-1).max()) <= 5


def _write_saelens(folder, cfg, tensors=None):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors or {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8),
                          "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)},
              str(folder / "sae_weights.safetensors"))


@pytest.mark.parametrize("cfg, message", [
    ({"architecture": "gated"}, r"SAELens architecture 'gated' has no sae-sweep equivalent; "
                                r"sae-sweep reads SAELens jumprelu, standard, topk SAEs"),
    ({"architecture": "standard", "normalize_activations": "layer_norm"},
     r"normalize_activations 'layer_norm' is not supported"),
    ({"architecture": "topk", "k": 2, "rescale_acts_by_decoder_norm": True},
     r"rescale_acts_by_decoder_norm is not supported"),
    ({"architecture": "standard", "metadata": {}}, r"names no hook"),
])
def test_what_we_cannot_represent_is_one_clear_line(tmp_path, cfg, message):
    cfg = {"d_in": 4, "d_sae": 8, "metadata": {"hook_name": "blocks.0.hook_resid_post"}, **cfg}
    _write_saelens(tmp_path / "s", cfg)
    with pytest.raises(SAELensFormatError, match=message):
        load_saelens(tmp_path / "s")


def test_a_folder_of_neither_format_names_both(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(Exception, match=r"holds neither format; sae-sweep reads a native SAE "
                       r"folder \(config.json \+ weights.safetensors.*or a SAELens export "
                       r"\(cfg.json \+ sae_weights.safetensors\)"):
        load_sae_folder(tmp_path / "x")


def test_eval_reads_a_saelens_export_like_the_native_folder(tmp_path, capsys):
    from activation_cache import load_model

    from _e2e_helpers import HOOKS, SPEC, build_cache
    from sweep.cli import main

    class Factory:  # tmp_path_factory's one method build_cache uses
        def mktemp(self, name):
            path = tmp_path / name
            path.mkdir()
            return path

    model = load_model(SPEC)
    cache = build_cache(Factory(), model, "cache", store_logits=True, logits_top_k=32)
    layer, name = HOOKS[0].split(".")[1], HOOKS[0].split(".")[2]
    sae, _ = _trained_like("batchtopk", d_in=32, d_sae=96, hook_layer=int(layer), hook_name=name)
    sae.save(tmp_path / "native")
    export_sae(sae, tmp_path / "saelens")
    records = {}
    for folder in ("native", "saelens"):
        records[folder] = evaluate_sae_dir(tmp_path / folder, cache=cache.uri, stream=io.StringIO(),
                                           show_progress=False, model=model)
    a, b = records["native"], records["saelens"]
    assert a.eval_tokens == b.eval_tokens > 0
    for metric in ("fvu", "l0", "ce_loss_spliced", "kl_div", "dead_fraction"):
        assert getattr(a, metric) == pytest.approx(getattr(b, metric), rel=1e-4, abs=1e-6), metric
    # through the CLI: a folder that is neither format is one line naming both formats
    (tmp_path / "neither").mkdir()
    assert main(["eval", str(tmp_path / "neither"), "--cache", cache.uri]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "native SAE folder" in err and "SAELens export" in err
