"""The SAELens export opens in sae_lens and gives our outputs on the same raw inputs."""

import json

import pytest
import torch

from trainer import SAEConfig, build_sae, export_saelens

sae_lens = pytest.importorskip("sae_lens")


@pytest.mark.parametrize("arch, saelens_arch", [("batchtopk", "jumprelu"), ("standard", "standard")])
def test_export_round_trips_through_sae_lens(tmp_path, arch, saelens_arch):
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=16, d_sae=64, top_k=4, architecture=arch, hook_layer=3)
    sae = build_sae(cfg, seed=0)
    x = torch.randn(200, 16) * 25 + 3  # raw activations far from unit scale
    sae.initialize_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    assert float(sae.input_scale) != 1.0
    if arch == "batchtopk":
        sae.calibrate_threshold(iter([x]), max_tokens=200)
        assert float(sae.threshold) > 0
    sae.eval()
    out = export_saelens(sae, tmp_path / "export")
    meta = json.loads((out / "cfg.json").read_text())
    assert meta["architecture"] == saelens_arch
    assert meta["metadata"]["hook_name"] == "blocks.3.hook_resid_post"

    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert theirs.cfg.architecture() == saelens_arch
    ours_f = sae.encode(x)
    their_f = theirs.encode(x)
    assert torch.equal(their_f > 0, ours_f > 0)
    assert torch.allclose(their_f, ours_f, rtol=1e-4, atol=1e-4)
    assert torch.allclose(theirs.decode(their_f), sae.decode(ours_f), rtol=1e-4, atol=1e-3)
    if arch == "batchtopk":
        assert torch.allclose(theirs.threshold, torch.full((64,), float(sae.threshold)))
        assert (ours_f > 0).sum().item() == 4 * 200  # calibrated: inference L0 = k
    # the caller's SAE is not modified by the export
    assert float(sae.input_scale) != 1.0
