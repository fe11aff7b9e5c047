"""What one shard holds, and computing and committing it with a loaded model.

:class:`Layout` fixes what every shard stores (hooks and splice residuals, storage dtype,
compact logits, exclusions) and how the model runs (``stop_at_layer`` after the last hooked block
when nothing downstream is needed). :class:`ShardWriter` runs the model over a shard's windows --
one ``run_with_cache`` per batch, only the stored hooks -- and commits the shard as three files,
each written atomically: ``shards/NAME.safetensors``, ``index/NAME.parquet`` (one row per real
token: split, shard, row, sequence, position, token_id, train_mask, doc_id) and, last,
``parts/NAME.json`` (sizes and sha256 checksums). A shard is committed exactly when its record
exists; the builder and its Ray workers share this code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .cache_config import CacheConfig
from .cache_errors import CacheInputError
from .compact_logits import compact_logprobs
from .manifest import act_key, config_digest
from .hook_names import HookNameError, active_hook_names, check_hook_name, parse_block_hook
from .shard_file import encode_shard
from .storage import Storage
from .synthetic import GroundTruth, SyntheticSpec, generate_window
from .windowed import train_mask_for

FULL_LOGPROBS_MAX_VOCAB = 8192
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Windows:
    """The windows of one split: tokens [N, T] int64, attention_mask [N, T] bool, doc_id [N]."""

    tokens: np.ndarray
    attention_mask: np.ndarray
    doc_id: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, start: int, stop: int) -> "Windows":
        return Windows(self.tokens[start:stop], self.attention_mask[start:stop],
                       self.doc_id[start:stop])


@dataclass(frozen=True)
class Unit:
    """One shard to compute: windows [start, stop) of a split."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


@dataclass
class Layout:
    """What every shard stores and how the model is run (shared by driver and workers)."""

    hooks: list[str]
    stored_hooks: list[str]
    splice_hooks: dict[str, str]
    d_in: dict[str, int]
    seq_len: int
    act_dtype: str
    stop_at_layer: int | None
    logits_k: int | None  # None: no logits stored
    d_vocab: int
    bos_token_id: int | None
    pad_token_id: int | None
    exclude_bos: bool
    exclude_token_ids: list[int]
    config_sha256: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def make_layout(cfg: CacheConfig, model, tokenizer_ids: tuple[int | None, int | None]) -> Layout:
    """Check the hooks and window length against the model and decide what is stored."""
    names = set(active_hook_names(model.hook_dict, model.cfg))
    n_ctx = int(model.cfg.n_ctx)
    if cfg.max_text_length > n_ctx:
        raise CacheInputError(
            f"CacheConfig.max_text_length: windows of {cfg.max_text_length} tokens are longer "
            f"than the model's context n_ctx={n_ctx}; use max_text_length <= {n_ctx}"
        )
    for h in cfg.hooks:
        try:
            check_hook_name(h, names, int(model.cfg.n_layers))
        except HookNameError as exc:
            raise CacheInputError(f"CacheConfig.hooks: {exc}") from None
    stored = list(cfg.hooks)
    splice: dict[str, str] = {}
    if cfg.splice_residual:
        for h in cfg.hooks:
            block = parse_block_hook(h)
            if block is None:
                raise CacheInputError(
                    f"CacheConfig.store_splice_residual: hook {h!r} is not inside a block "
                    "(blocks.L....), so there is no splice residual to store"
                )
            splice[h] = block.resid_pre
            if splice[h] not in stored:
                stored.append(splice[h])
    blocks = [parse_block_hook(h) for h in stored]
    if cfg.store_logits or any(b is None for b in blocks):
        stop = None
    else:
        stop = max(b.layer for b in blocks) + 1
        if stop >= model.cfg.n_layers:
            stop = None
    d_vocab = int(model.cfg.d_vocab_out if getattr(model.cfg, "d_vocab_out", -1) > 0
                  else model.cfg.d_vocab)
    logits_k = None
    if cfg.store_logits:
        if cfg.logits_top_k is None:
            if d_vocab > FULL_LOGPROBS_MAX_VOCAB:
                raise CacheInputError(
                    f"CacheConfig.logits_top_k: null (full log-probs) is only allowed for "
                    f"vocabularies of at most {FULL_LOGPROBS_MAX_VOCAB}; this model has {d_vocab}"
                )
            logits_k = d_vocab
        else:
            if cfg.logits_top_k > d_vocab:
                raise CacheInputError(f"CacheConfig.logits_top_k: {cfg.logits_top_k} is larger "
                                      f"than the vocabulary ({d_vocab})")
            logits_k = cfg.logits_top_k
    d_in = {h: _hook_width(model, h) for h in stored}
    bos, pad = tokenizer_ids
    return Layout(
        hooks=list(cfg.hooks), stored_hooks=stored, splice_hooks=splice, d_in=d_in,
        seq_len=cfg.max_text_length, act_dtype=cfg.dtype, stop_at_layer=stop, logits_k=logits_k,
        d_vocab=d_vocab, bos_token_id=bos, pad_token_id=pad, exclude_bos=cfg.exclude_bos,
        exclude_token_ids=list(cfg.exclude_token_ids), config_sha256=config_digest(cfg.to_dict()),
    )


def _hook_width(model, hook: str) -> int:
    """The last dimension of a hook's activation, measured with a one-token forward pass."""
    tokens = torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device)
    block = parse_block_hook(hook)
    stop = block.layer + 1 if block and block.layer + 1 < model.cfg.n_layers else None
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop)
    act = cache[hook]
    if act.ndim != 3:
        raise CacheInputError(
            f"CacheConfig.hooks: {hook!r} has activations of shape {tuple(act.shape)}; only "
            "[batch, position, d] hooks can be cached (e.g. hook_resid_post, hook_mlp_out, "
            "hook_attn_out)"
        )
    return int(act.shape[-1])


class ShardWriter:
    """Computes shards with a loaded model and commits them to storage (driver or Ray actor)."""

    def __init__(self, model, layout: Layout, storage: Storage, batch_size: int):
        self.model = model
        self.layout = layout
        self.storage = storage
        self.batch_size = batch_size
        self.device = model.cfg.device

    def compute(self, unit: Unit, w: Windows,
                on_batch: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
        """The shard's tensors (CPU): its activations (``activations``) and its windows'
        tokens, masks, sequence numbers and document ids."""
        lay = self.layout
        tensors = self.activations(w, on_batch)
        tokens, am = torch.from_numpy(w.tokens), torch.from_numpy(w.attention_mask)
        tensors["tokens"] = tokens.to(torch.int32)
        tensors["attention_mask"] = am
        tensors["train_mask"] = train_mask_for(
            tokens, am, bos_token_id=lay.bos_token_id, exclude_bos=lay.exclude_bos,
            exclude_token_ids=lay.exclude_token_ids)
        tensors["sequence"] = torch.arange(unit.start, unit.stop, dtype=torch.int64)
        tensors["doc_id"] = torch.from_numpy(w.doc_id.astype(np.int64))
        return tensors

    def activations(self, w: Windows, on_batch: Callable[[int], None] | None = None
                    ) -> dict[str, torch.Tensor]:
        """The stored activations (and compact logits) of windows ``w``, running the model
        batch by batch."""
        parts: dict[str, list[torch.Tensor]] = {}
        for a in range(0, len(w), self.batch_size):
            b = min(len(w), a + self.batch_size)
            out = self.forward(torch.from_numpy(w.tokens[a:b]), torch.from_numpy(w.attention_mask[a:b]))
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
            if on_batch is not None:
                on_batch(int(w.attention_mask[a:b].sum()))
        return {k: torch.cat(v) for k, v in parts.items()}

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """One model pass: stored activations (in the storage dtype, converted before leaving the
        device) and, when stored, the compact logits of a batch of windows; all on the CPU."""
        lay = self.layout
        toks = tokens.to(self.device, torch.long)
        am = attention_mask.to(self.device)
        want_logits = lay.logits_k is not None
        out, cache = self.model.run_with_cache(
            toks, attention_mask=am.long(), names_filter=list(lay.stored_hooks),
            stop_at_layer=lay.stop_at_layer, return_type="logits" if want_logits else None,
        )
        dt = TORCH_DTYPES[lay.act_dtype]
        result = {act_key(h): cache[h].to(dt).cpu() for h in lay.stored_hooks}
        if want_logits:
            topk_lp, topk_idx, lse = compact_logprobs(out, lay.logits_k)
            nxt = torch.full(toks.shape, float("nan"), device=out.device)
            gathered = out[:, :-1].float().gather(-1, toks[:, 1:, None]).squeeze(-1) - lse[:, :-1]
            valid = am[:, :-1].bool() & am[:, 1:].bool()
            nxt[:, :-1] = torch.where(valid, gathered, torch.full_like(gathered, float("nan")))
            result.update(
                clean_topk_logprobs=topk_lp.cpu(), clean_topk_indices=topk_idx.to(torch.int32).cpu(),
                clean_logsumexp=lse.cpu(), clean_next_token_logprob=nxt.cpu(),
            )
        return result

    def commit(self, unit: Unit, tensors: dict[str, torch.Tensor]) -> dict:
        """Write the shard, its index and (last) its record; returns the record."""
        data, rec = encode_shard(tensors)
        file = f"shards/{unit.name}.safetensors"
        self.storage.write_atomic(file, data)
        del data
        index = _index_bytes(unit, tensors)
        index_file = f"index/{unit.name}.parquet"
        self.storage.write_atomic(index_file, index)
        am, tm = tensors["attention_mask"], tensors["train_mask"]
        record = {
            "name": unit.name, "split": unit.split, "file": file, "bytes": rec["bytes"],
            "sha256": rec["sha256"], "first_sequence": unit.start,
            "num_sequences": unit.stop - unit.start, "num_tokens": int(am.sum()),
            "num_train_tokens": int(tm.sum()), "tensors": rec["tensors"],
            "index_file": index_file, "index_bytes": len(index),
            "index_sha256": hashlib.sha256(index).hexdigest(),
            "config_sha256": self.layout.config_sha256,
        }
        self.storage.write_atomic(f"parts/{unit.name}.json", json.dumps(record).encode())
        return record

    def build(self, unit: Unit, w: Windows) -> dict:
        return self.commit(unit, self.compute(unit, w))


class SyntheticShardWriter(ShardWriter):
    """A ShardWriter whose activations are generated from known sparse features
    (activation_cache/synthetic.py) instead of computed by a model: a window's activations
    depend only on the spec and its global window number (its ``doc_id``)."""

    def __init__(self, spec: SyntheticSpec, truth: GroundTruth, layout: Layout,
                 storage: Storage):
        self.spec, self.truth = spec, truth
        self.model, self.layout, self.storage = None, layout, storage
        self.batch_size, self.device = 1, "cpu"

    def activations(self, w: Windows, on_batch: Callable[[int], None] | None = None
                    ) -> dict[str, torch.Tensor]:
        rows = []
        for i, window in enumerate(w.doc_id):
            rows.append(generate_window(self.spec, self.truth, int(window), w.tokens.shape[1]))
            if on_batch is not None:
                on_batch(int(w.attention_mask[i].sum()))
        acts = torch.stack(rows) if rows else torch.zeros(0, w.tokens.shape[1], self.spec.d)
        return {act_key(self.layout.hooks[0]): acts.to(TORCH_DTYPES[self.layout.act_dtype])}


def _index_bytes(unit: Unit, t: dict[str, torch.Tensor]) -> bytes:
    """The per-token Parquet index of a shard: one row per real (non-padding) token."""
    am = t["attention_mask"].numpy()
    rows, pos = np.nonzero(am)
    table = pa.table({
        "split": pa.array(np.full(len(rows), unit.split, dtype=object)).dictionary_encode(),
        "shard": pa.array(np.full(len(rows), unit.index, dtype=np.int32)),
        "row": pa.array(rows.astype(np.int32)),
        "sequence": pa.array(t["sequence"].numpy()[rows]),
        "position": pa.array(pos.astype(np.int32)),
        "token_id": pa.array(t["tokens"].numpy()[rows, pos]),
        "train_mask": pa.array(t["train_mask"].numpy()[rows, pos]),
        "doc_id": pa.array(t["doc_id"].numpy()[rows]),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
