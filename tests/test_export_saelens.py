"""The SAELens export of every architecture opens in sae_lens and gives our shipped encoder's
outputs on the same raw inputs (max abs difference printed with -s)."""

import json

import pytest
import torch

from trainer import architecture_names, build_sae, export_saelens, field_catalog, make_sae_config

sae_lens = pytest.importorskip("sae_lens")

EXPECTED = {"standard": "standard", "topk": "topk", "batchtopk": "jumprelu",
            "jumprelu": "jumprelu", "matryoshka_batchtopk": "jumprelu"}


def _options(arch):
    """The architecture's own fields for this case, chosen by field name (a new architecture
    with defaults for everything else needs nothing here)."""
    return {"top_k": 4} if "top_k" in field_catalog().owned[arch] else {}


@pytest.mark.parametrize("arch", architecture_names())
def test_export_round_trips_through_sae_lens(tmp_path, arch):
    assert arch in EXPECTED, f"add the SAELens name of new architecture {arch!r} here"
    torch.manual_seed(0)
    cfg = make_sae_config(d_in=16, d_sae=64, architecture=arch, hook_layer=3, **_options(arch))
    sae = build_sae(cfg, seed=0)
    x = torch.randn(400, 16) * 25 + 3  # raw activations far from unit scale
    sae.initialize_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if arch == "jumprelu":  # thresholds that cut something, different per latent
            sae.threshold.copy_(torch.empty(64).uniform_(0.05, 1.6))
    assert float(sae.input_scale) != 1.0
    if sae.needs_calibration:
        assert sae.calibrate(iter([x[:200]]), max_tokens=200) is not None
    sae.eval()
    out = export_saelens(sae, tmp_path / "export")
    meta = json.loads((out / "cfg.json").read_text())
    assert meta["architecture"] == EXPECTED[arch]
    assert meta["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert meta["metadata"]["sae_sweep_architecture"] == arch

    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert theirs.cfg.architecture() == EXPECTED[arch]
    held_out = x[200:]
    ours_f = sae.encode(held_out)
    their_f = theirs.encode(held_out)
    diff_f = float((their_f - ours_f).abs().max())
    diff_x = float((theirs.decode(their_f) - sae.decode(ours_f)).abs().max())
    print(f"{arch}: max |encode diff| {diff_f:.3g}, max |decode diff| {diff_x:.3g}")
    assert torch.equal(their_f > 0, ours_f > 0)
    assert diff_f <= 1e-4 * (1 + float(ours_f.abs().max()))
    assert diff_x <= 1e-4 * (1 + float(held_out.abs().max()))
    l0 = float((ours_f > 0).sum(-1).float().mean())
    assert l0 > 0
    if arch == "topk":
        assert (ours_f > 0).sum(-1).max() <= 4
    if sae.needs_calibration:
        # calibrated on the first 200 tokens; on the other 200 the shipped L0 is near k
        assert l0 == pytest.approx(4.0, rel=0.25)
    # the caller's SAE is not modified by the export
    assert float(sae.input_scale) != 1.0
