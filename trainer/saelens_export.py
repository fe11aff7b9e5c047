"""Export an SAE in SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``).

The export takes raw activations (the input scaling is folded into the weights) and gives the
same encode/decode outputs as our shipped encoder. Each architecture says how it maps
(``SAE.saelens_format``): ``standard`` -> SAELens ``standard``; ``topk`` -> ``topk`` with ``k``;
``jumprelu`` -> ``jumprelu`` with its thresholds; ``batchtopk`` and ``matryoshka_batchtopk`` ->
``jumprelu`` with the calibrated global threshold as every latent's threshold (their inference
form; SAELens saves its own BatchTopK SAEs the same way). A transcoder (its options say
``transcodes``) exports to SAELens's transcoder classes (``cfg.json`` gets ``d_out``,
``apply_b_dec_to_input: false``, and the metadata both hooks: ``hook_name`` is the input,
``hook_name_out`` the output).

sae-lens is not imported: the files follow its documented 6.x layout, and a test opens them with
``sae_lens.SAE.load_from_disk``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from safetensors.torch import save_file

from .checkpoint import atomic_directory
from .saes.base import SAE

SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"


def export_saelens(sae: SAE, out_dir: str | Path, *, model_name: Optional[str] = None,
                   extra_metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write ``sae`` to ``out_dir`` in SAELens format (atomically) and return the folder."""
    folded = sae.folded_copy()
    tensors = {
        "W_enc": folded.W_enc.detach(),
        "W_dec": folded.W_dec.detach(),
        "b_enc": folded.b_enc.detach(),
        "b_dec": folded.b_dec.detach(),
    }
    fmt = sae.saelens_format(folded)
    tensors.update(fmt.tensors)
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "hook_name": sae.hook_spec,
        **({"hook_name_out": sae.hook_spec_out} if sae.transcodes else {}),
        "exported_by": "sae-sweep",
        "sae_sweep_architecture": sae.architecture,
        **fmt.metadata,
    }
    if model_name is not None:
        metadata["model_name"] = model_name
    metadata.update(extra_metadata or {})
    cfg = {
        "architecture": fmt.architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        **({"d_out": sae.cfg.d_out} if sae.transcodes else {}),
        "dtype": sae.cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": sae.input_bias() is not None,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **fmt.cfg,
        "metadata": metadata,
    }
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / SAELENS_WEIGHTS_FILE))
        (tmp / SAELENS_CFG_FILE).write_text(json.dumps(cfg, indent=2))
    return out
