"""Loading a :class:`ModelSpec` as a frozen transformer_lens ``HookedTransformer``; the
conversion cache; a model's hook names from its configuration alone.

``smollm2``, ``gguf`` and ``hf_dir`` share one path: transformers loads the HF model (GGUF
weights are de-quantised to float), transformer_lens converts its config and weights, and the
converted result (transformer_lens config source, tokenizer, float32 state dict) is cached
under ``$SAE_SWEEP_CACHE_DIR`` (default ``~/.cache/sae-sweep``) keyed by the source files'
sha256, so the slow conversion runs once. ``name`` uses transformer_lens's own conversion and
then the same assembly step; ``tiny`` is built in code.

Weight processing: none. The model is assembled with ``fold_ln``, ``center_writing_weights``,
``center_unembed`` and ``fold_value_biases`` all off, so every hook holds exactly what the
original model computes (``blocks.L.hook_resid_post`` equals HF ``hidden_states[L+1]`` and the
logits equal HF logits; tests check this). That is the residual stream an SAE trained here
must reconstruct when it is spliced back or exported to SAELens.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .hashing import cache_root
from .hook_names import active_hook_names, block_hook_name, parse_block_hook
from .model_spec import CONVERTER_VERSION, ModelLoadError, ModelSpec, source_path, source_sha256

log = logging.getLogger(__name__)


def load_model(spec: ModelSpec | None = None) -> Any:
    """Load ``spec`` as a ``transformer_lens.HookedTransformer`` in eval mode with frozen weights.

    Raises :class:`ModelLoadError` (a UserError) naming the file when the source is missing or
    unreadable, and when ``device`` is cuda on a machine without CUDA.
    """
    spec = spec or ModelSpec()
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"ModelSpec.device: {spec.device!r} asked for, but CUDA is not "
                             "available on this machine; use device: cpu")
    if spec.source == "tiny":
        model = _build_tiny(spec)
    elif spec.source == "name":
        model = _load_by_name(spec)
    else:
        with _converted(spec) as entry:
            model = _assemble(entry, spec)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def config_hook_names(spec: ModelSpec) -> tuple[list[str], int] | None:
    """``(hook names that fire, number of layers)`` of the model ``spec`` loads, from its
    configuration alone -- no weights are loaded or converted -- so hook names can be checked in
    a second instead of after a model load (see :func:`.hook_names.check_hook_name`). Hook
    points transformer_lens only runs behind a config flag (``hook_mlp_in``...) are left out.

    Reads the tiny recipe, a HuggingFace folder's ``config.json``, a converted model's cached
    config or a GGUF file's metadata. Returns None when the configuration cannot be read that
    way (source ``name``, or a file transformers cannot parse: the model load reports it).
    Raises :class:`ModelLoadError` when the source file or folder does not exist, or ``n_ctx``
    exceeds the model's context.
    """
    cfg = _config_only(spec)
    if cfg is None:
        return None
    n_layers = int(cfg.n_layers)
    one_block = copy.deepcopy(cfg)
    one_block.n_layers = 1
    one_block.tokenizer_name = None
    with torch.device("meta"):  # a skeleton without memory: only its hook points matter
        skeleton = _new_hooked_transformer(one_block, None)
    names = []
    for name in skeleton.hook_dict:
        block = parse_block_hook(name)  # the one block's hooks stand for every block's
        if block is not None:
            names += [block_hook_name(layer, block.point) for layer in range(n_layers)]
        else:
            names.append(name)
    return sorted(active_hook_names(names, cfg)), n_layers


def _load_hf(spec: ModelSpec) -> tuple[Any, Any]:
    """(HF causal-LM in float32 on CPU, tokenizer) for the file-based sources, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = source_path(spec)
    if path.is_file():
        where, kwargs = str(path.parent), {"gguf_file": path.name}
        what = f"GGUF file {path}"
    else:
        where, kwargs = str(path), {}
        what = f"HuggingFace model folder {path}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(
            where, local_files_only=True, dtype=torch.float32, **kwargs)
    except Exception as exc:  # any parse failure of a user-supplied file is a user error
        raise ModelLoadError(f"ModelSpec.path: could not load the {what}: "
                             f"{type(exc).__name__}: {_one_line(exc)}") from exc
    return hf_model, tokenizer


@dataclass(frozen=True)
class _ConvertedEntry:
    """A converted model in the cache: HF config folder, tokenizer folder, TL state dict."""

    root: Path

    @property
    def hf_config_dir(self) -> Path:
        return self.root / "hf-config"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def state_dict_file(self) -> Path:
        return self.root / "state_dict.safetensors"

    @property
    def meta_file(self) -> Path:
        return self.root / "meta.json"


_convert_lock = threading.Lock()


def _entry_for(digest: str) -> _ConvertedEntry:
    """Where the converted form of a source with sha256 ``digest`` is cached."""
    key = f"{digest[:32]}-tl{_version('transformer-lens')}-v{CONVERTER_VERSION}"
    return _ConvertedEntry(cache_root() / "models" / key)


def _cached_entry(spec: ModelSpec) -> _ConvertedEntry | None:
    """The finished converted entry of a file-based source, if it is cached."""
    entry = _entry_for(source_sha256(spec))
    return entry if entry.meta_file.is_file() else None


@contextlib.contextmanager
def _converted(spec: ModelSpec) -> Iterator[_ConvertedEntry]:
    """The converted form of a file-based source, converting it first when it is not cached.

    Conversions are cached under :func:`cache_root` (written to a temporary name, renamed when
    complete, so a crash or a concurrent process never leaves half an entry). When that folder
    cannot be written, the conversion goes to a temporary folder that is removed afterwards.
    """
    digest = source_sha256(spec)
    entry = _entry_for(digest)
    key = entry.root.name
    if entry.meta_file.is_file():
        yield entry
        return
    with _convert_lock:
        if entry.meta_file.is_file():
            yield entry
            return
        hf_model, tokenizer = _load_hf(spec)
        try:
            entry.root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.root.parent))
        except OSError as exc:
            log.warning("cannot cache the converted model in %s (%s); converting to a temporary "
                        "folder for this run only", entry.root.parent, exc)
            with tempfile.TemporaryDirectory(prefix="sae-sweep-model-") as tmp:
                scratch = _ConvertedEntry(Path(tmp))
                _write_entry(scratch, hf_model, tokenizer, spec, digest)
                yield scratch
            return
        log.info("converting %s to transformer_lens once (cached in %s)", spec.label, entry.root)
        try:
            staging.chmod(0o755)
            _write_entry(_ConvertedEntry(staging), hf_model, tokenizer, spec, digest)
            try:
                os.rename(staging, entry.root)
            except OSError:
                if not entry.meta_file.is_file():  # not a concurrent writer's finished entry
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    yield entry


def _write_entry(entry: _ConvertedEntry, hf_model: Any, tokenizer: Any, spec: ModelSpec,
                 digest: str) -> None:
    from safetensors.torch import save_file
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are de-quantised floats by now
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    config.save_pretrained(entry.hf_config_dir)
    tokenizer.save_pretrained(entry.tokenizer_dir)
    cfg = _tl_config(entry.hf_config_dir, torch.float32, "cpu", None)
    try:
        state_dict = get_pretrained_state_dict(str(entry.hf_config_dir), cfg, hf_model=hf_model,
                                               dtype=torch.float32)
    except NotImplementedError as exc:
        raise ModelLoadError(f"ModelSpec.path: transformer_lens cannot convert {spec.label}: "
                             f"{_one_line(exc)}") from exc
    save_file({k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()},
              str(entry.state_dict_file))
    meta = {"source": spec.source, "label": spec.label, "source_sha256": digest,
            "converter_version": CONVERTER_VERSION,
            "transformer_lens": _version("transformer-lens"),
            "transformers": _version("transformers")}
    entry.meta_file.write_text(json.dumps(meta, indent=2))  # written last: marks the entry done


# transformer_lens picks some architectures by a substring of the model path, not its config.
_TL_NAME_TRIGGERS = ("llama", "gemma")


def _tl_config(hf_config_dir: Path, dtype: torch.dtype, device: str, n_ctx: int | None) -> Any:
    """transformer_lens config converted from the HF config.json in ``hf_config_dir``."""
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    config_json = (hf_config_dir / "config.json").read_text()
    with tempfile.TemporaryDirectory(prefix="sae-sweep-cfg-") as tmp:
        if any(t in tmp.lower() for t in _TL_NAME_TRIGGERS):
            raise ModelLoadError(f"the temporary folder {tmp} contains one of "
                                 f"{_TL_NAME_TRIGGERS}, which confuses transformer_lens; "
                                 "point TMPDIR elsewhere")
        Path(tmp, "config.json").write_text(config_json)
        try:
            cfg = get_pretrained_model_config(tmp, fold_ln=False, device=device, dtype=dtype)
        except NotImplementedError as exc:
            raise ModelLoadError(f"transformer_lens does not support this model: {_one_line(exc)}") from exc
    native = int(cfg.n_ctx)
    if n_ctx is not None:
        if n_ctx > native:
            raise ModelLoadError(f"ModelSpec.n_ctx: {n_ctx} exceeds the model's own context "
                                 f"length {native}; it may only be shortened")
        cfg.n_ctx = n_ctx
    return cfg


def _assemble(entry: _ConvertedEntry, spec: ModelSpec) -> Any:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = _tl_config(entry.hf_config_dir, spec.torch_dtype, spec.device, spec.n_ctx)
    cfg.model_name = spec.label
    cfg.tokenizer_name = str(entry.tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(entry.tokenizer_dir), add_bos_token=True,
                                              local_files_only=True)
    state_dict = load_file(str(entry.state_dict_file))
    return _hooked(cfg, tokenizer, state_dict, spec)


def _hooked(cfg: Any, tokenizer: Any, state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> Any:
    """HookedTransformer from a TL config and state dict, with no weight processing at all.

    This is ``load_and_process_state_dict`` with every processing flag off, loading the state
    dict in one strict call instead of transformer_lens's one call per key (which walks the
    module tree each time: ~15 s for SmolLM2's 574 tensors, against ~1 s).
    """
    from transformer_lens.weight_processing import ProcessWeights

    model = _new_hooked_transformer(cfg, tokenizer)
    state_dict = {k: v.to(spec.torch_dtype) for k, v in state_dict.items()}
    state_dict = model.fill_missing_keys(state_dict)
    state_dict = ProcessWeights.process_weights(
        state_dict, model.cfg, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(spec.device, print_details=False)


def _new_hooked_transformer(cfg: Any, tokenizer: Any) -> Any:
    """``HookedTransformer(cfg, tokenizer)``, not yet moved to a device, without its deprecation
    notice (transformer-lens 3.x points to TransformerBridge; the project targets the
    HookedTransformer API on purpose, see ARCHITECTURE.md)."""
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated",
                                category=DeprecationWarning)
        return HookedTransformer(cfg, tokenizer, move_to_device=False)


def _load_by_name(spec: ModelSpec) -> Any:
    from transformer_lens.loading_from_pretrained import (
        get_official_model_name,
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )
    from transformers import AutoTokenizer

    try:
        official = get_official_model_name(str(spec.name))
    except ValueError:
        from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES
        close = difflib.get_close_matches(str(spec.name), OFFICIAL_MODEL_NAMES, n=5, cutoff=0.5)
        raise ModelLoadError(
            f"ModelSpec.name: {spec.name!r} is not an official transformer_lens model name"
            + (f"; close names: {', '.join(close)}" if close else "")) from None
    try:
        cfg = get_pretrained_model_config(official, fold_ln=False, device=spec.device,
                                          dtype=spec.torch_dtype)
        state_dict = get_pretrained_state_dict(official, cfg, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name, add_bos_token=True)
    except (OSError, ValueError, NotImplementedError) as exc:
        raise ModelLoadError(
            f"ModelSpec.name: could not load {official!r} from the HuggingFace hub or its local "
            f"cache (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {_one_line(exc)}") from exc
    if spec.n_ctx is not None:
        if spec.n_ctx > cfg.n_ctx:
            raise ModelLoadError(f"ModelSpec.n_ctx: {spec.n_ctx} exceeds the model's own context "
                                 f"length {cfg.n_ctx}; it may only be shortened")
        cfg.n_ctx = spec.n_ctx
    return _hooked(cfg, tokenizer, state_dict, spec)


def _tiny_config(spec: ModelSpec, d_vocab: int) -> Any:
    from transformer_lens import HookedTransformerConfig

    d_head = spec.tiny_d_model // spec.tiny_n_heads
    return HookedTransformerConfig(
        model_name=spec.label,
        n_layers=spec.tiny_n_layers,
        d_model=spec.tiny_d_model,
        n_heads=spec.tiny_n_heads,
        d_head=d_head,
        d_mlp=spec.tiny_d_mlp,
        n_ctx=spec.n_ctx or 256,
        d_vocab=d_vocab,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        default_prepend_bos=True,
        init_weights=True,
        dtype=spec.torch_dtype,
        device="cpu",
    )


def _config_only(spec: ModelSpec) -> Any:
    """The transformer_lens config of ``spec`` without its weights (see config_hook_names)."""
    if spec.source == "tiny":
        return _tiny_config(spec, d_vocab=2)  # the vocabulary does not change the hook names
    if spec.source == "name":
        return None  # its config may need the hub; the load checks the hooks
    path = source_path(spec)  # ModelLoadError when missing
    entry = _cached_entry(spec)
    try:
        if entry is not None:
            return _tl_config(entry.hf_config_dir, torch.float32, "cpu", spec.n_ctx)
        if path.is_dir():
            return _tl_config(path, torch.float32, "cpu", spec.n_ctx)
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                            local_files_only=True)
        if not getattr(config, "architectures", None):
            config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        with tempfile.TemporaryDirectory(prefix="sae-sweep-gguf-config-") as tmp:
            config.save_pretrained(tmp)
            return _tl_config(Path(tmp), torch.float32, "cpu", spec.n_ctx)
    except ModelLoadError as exc:
        if "n_ctx" in str(exc):
            raise
        return None
    except Exception as exc:  # unreadable here: the model load reports it properly
        log.debug("no config-only hook check for %s: %s", spec.label, exc)
        return None


def _build_tiny(spec: ModelSpec) -> Any:
    if spec.tiny_tokenizer == "bytes":
        from .byte_tokenizer import byte_tokenizer
        tokenizer = byte_tokenizer()
    else:
        tokenizer = _assemble_tokenizer_only(ModelSpec())
    cfg = _tiny_config(spec, d_vocab=len(tokenizer))
    # Seed a forked RNG so building a tiny model neither depends on nor disturbs global state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.tiny_seed)
        model = _new_hooked_transformer(cfg, tokenizer)
    return model.to(spec.device, print_details=False)


def _assemble_tokenizer_only(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    with _converted(spec) as entry:
        return AutoTokenizer.from_pretrained(str(entry.tokenizer_dir), add_bos_token=True,
                                             local_files_only=True)



def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
