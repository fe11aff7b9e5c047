"""The SAELens export of every architecture opens in sae_lens and gives our shipped encoder's
outputs on the same raw, held-out inputs (max abs difference printed with -s): the codes, and
the reconstruction of the target (a transcoder's: SAELens's ``forward``, skip path included).
Both of a transcoder's hooks are in the exported metadata."""

import json

import pytest
import torch

from trainer import architecture_names, build_sae, export_saelens, field_catalog, make_sae_config

sae_lens = pytest.importorskip("sae_lens")

EXPECTED = {"standard": "standard", "topk": "topk", "batchtopk": "jumprelu",
            "jumprelu": "jumprelu", "matryoshka_batchtopk": "jumprelu",
            "batchtopk_transcoder": "jumprelu_transcoder",
            "batchtopk_skip_transcoder": "jumprelu_skip_transcoder"}


def _options(arch):
    """The architecture's own fields for this case, chosen by field name (a new architecture
    with defaults for everything else needs nothing here); a transcoder writes hook_mlp_out
    (width 12) from the input hook."""
    out = {"top_k": 4} if "top_k" in field_catalog().owned[arch] else {}
    if arch in field_catalog().transcoders:
        out.update(hook_name="ln2.hook_normalized", hook_name_out="hook_mlp_out", d_out=12)
    return out


@pytest.mark.parametrize("arch", architecture_names())
def test_export_round_trips_through_sae_lens(tmp_path, arch):
    assert arch in EXPECTED, f"add the SAELens name of new architecture {arch!r} here"
    torch.manual_seed(0)
    cfg = make_sae_config(d_in=16, d_sae=64, architecture=arch, hook_layer=3, **_options(arch))
    transcoder = not cfg.autoencodes
    sae = build_sae(cfg, seed=0)
    x = torch.randn(400, 16) * 25 + 3  # raw activations far from unit scale
    y = (x[:, :12] * 0.5 - 4 + torch.randn(400, 12) * 3) if transcoder else x
    sae.initialize_from_data(x, y)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if arch == "jumprelu":  # thresholds that cut something, different per latent
            sae.threshold.copy_(torch.empty(64).uniform_(0.05, 1.6))
        for name, p in sae.named_parameters():
            if name == "W_skip":  # a skip path that matters (it starts at zero)
                p.normal_(0, 0.2)
    assert float(sae.input_scale) != 1.0
    if transcoder:
        assert float(sae.output_scale) != 1.0 and float(sae.output_scale) != float(sae.input_scale)
    if sae.needs_calibration:
        assert sae.calibrate(iter([x[:200]]), max_tokens=200) is not None
    sae.eval()
    out = export_saelens(sae, tmp_path / "export")
    meta = json.loads((out / "cfg.json").read_text())
    assert meta["architecture"] == EXPECTED[arch]
    assert meta["metadata"]["sae_sweep_architecture"] == arch
    if transcoder:
        assert meta["metadata"]["hook_name"] == "blocks.3.ln2.hook_normalized"
        assert meta["metadata"]["hook_name_out"] == "blocks.3.hook_mlp_out"
        assert meta["d_out"] == 12 and meta["apply_b_dec_to_input"] is False
    else:
        assert meta["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
        assert "hook_name_out" not in meta["metadata"] and meta["apply_b_dec_to_input"] is True

    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert theirs.cfg.architecture() == EXPECTED[arch]
    held_out, target = x[200:], y[200:]
    with torch.no_grad():
        ours_y, ours_f = sae(held_out)
        their_f = theirs.encode(held_out)
        their_y = theirs(held_out) if transcoder else theirs.decode(their_f)
    diff_f = float((their_f - ours_f).abs().max())
    diff_y = float((their_y - ours_y).abs().max())
    print(f"{arch}: max |encode diff| {diff_f:.3g}, max |output diff| {diff_y:.3g}")
    assert torch.equal(their_f > 0, ours_f > 0)
    assert diff_f <= 1e-4 * (1 + float(ours_f.abs().max()))
    assert diff_y <= 1e-4 * (1 + float(target.abs().max()))
    assert their_y.shape == target.shape
    l0 = float((ours_f > 0).sum(-1).float().mean())
    assert l0 > 0
    if arch == "topk":
        assert (ours_f > 0).sum(-1).max() <= 4
    if sae.needs_calibration:
        # calibrated on the first 200 tokens; on the other 200 the shipped L0 is near k
        assert l0 == pytest.approx(4.0, rel=0.25)
    if "W_skip" in dict(sae.named_parameters()):  # the skip path is really exported and used
        no_skip = ours_y - (held_out @ sae.W_skip.t() * sae.input_scale / sae.output_scale)
        assert float((their_y - no_skip).abs().max()) > 100 * max(diff_y, 1e-6)
    # the caller's SAE is not modified by the export
    assert float(sae.input_scale) != 1.0
