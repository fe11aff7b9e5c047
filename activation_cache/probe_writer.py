"""Computing and committing a cache's probe sets (activation_cache/probes.py) at build time.

Each set commits as two files, like a shard: ``probes/STEM.safetensors`` (``acts.{hook}``
[n, d] float32 for every SAE hook of the cache -- the activation at the text's last token --,
``label`` [n] int64, ``part`` [n] int8, ``source_row`` [n] int64, ``num_tokens`` [n] int32)
and last its record ``probes/STEM.json`` (name, source, classes, counts, sizes, sha256, the
config digest). A rerun of an interrupted build skips every set whose record matches (same
config, file of the recorded size), so probe sets resume like shards. The manifest's ``probes``
entry merges the records.

Tokenisation is the cache's own (no special tokens added or parsed from the text, BOS prepended
when the cache prepends one); a text longer than ``max_text_tokens`` keeps its last tokens.
Texts run in batches of similar length (right-padded, with an attention mask), so padding costs
little, and only up to the last hooked block.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Callable

import numpy as np
import torch

from .cache_errors import CacheError, CacheInputError
from .hook_names import parse_block_hook
from .manifest import act_key
from .probes import PARTS, POOLING, ProbesSpec, ProbeTexts, probe_file_name
from .storage import Storage

log = logging.getLogger("activation_cache")

PROBE_FOLDER = "probes/"


def tokenize_probe_texts(tokenizer, texts: list[str], *, max_tokens: int,
                         bos_token_id: int | None) -> list[np.ndarray]:
    """Each text's token ids as the model sees it: BOS (when given) then the text's last
    ``max_tokens`` (minus BOS) tokens."""
    room = max_tokens - (1 if bos_token_id is not None else 0)
    out = []
    for start in range(0, len(texts), 64):
        enc = tokenizer(texts[start:start + 64], add_special_tokens=False,
                        split_special_tokens=True, verbose=False)["input_ids"]
        for ids in enc:
            ids = list(ids)[-room:] if room > 0 else []
            if bos_token_id is not None:
                ids = [bos_token_id] + ids
            if not ids:
                raise CacheInputError("ProbesSpec: a probe text is empty after tokenisation "
                                      "and the cache prepends no BOS; remove empty texts")
            out.append(np.asarray(ids, dtype=np.int64))
    return out


@torch.inference_mode()
def pooled_activations(model, token_ids: list[np.ndarray], hooks: list[str], *,
                       batch_size: int, pad_id: int,
                       on_batch: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """{hook: float32 [n, d]}: each text's activation at its last token (one model pass per
    batch of texts of similar length)."""
    n = len(token_ids)
    lengths = np.asarray([len(t) for t in token_ids])
    order = np.argsort(lengths, kind="stable")
    blocks = [parse_block_hook(h) for h in hooks]
    stop = None
    if all(b is not None for b in blocks):
        stop = max(b.layer for b in blocks) + 1
        if stop >= model.cfg.n_layers:
            stop = None
    out = {h: None for h in hooks}
    device = model.cfg.device
    for a in range(0, n, batch_size):
        idx = order[a:a + batch_size]
        width = int(lengths[idx].max())
        toks = np.full((len(idx), width), pad_id, dtype=np.int64)
        am = np.zeros((len(idx), width), dtype=bool)
        for r, i in enumerate(idx):
            toks[r, :lengths[i]] = token_ids[i]
            am[r, :lengths[i]] = True
        _, cache = model.run_with_cache(
            torch.from_numpy(toks).to(device), attention_mask=torch.from_numpy(am).long().to(device),
            names_filter=list(hooks), stop_at_layer=stop, return_type=None)
        last = torch.as_tensor(lengths[idx] - 1, device=device)
        rows = torch.arange(len(idx), device=device)
        for h in hooks:
            pooled = cache[h][rows, last].float().cpu()
            if out[h] is None:
                out[h] = torch.zeros(n, pooled.shape[-1], dtype=torch.float32)
            out[h][torch.from_numpy(idx)] = pooled
        if on_batch is not None:
            on_batch(int(lengths[idx].sum()))
    return out


def probe_record_name(name: str) -> str:
    return f"{PROBE_FOLDER}{probe_file_name(name)}.json"


def committed_probe_set(storage: Storage, name: str, config_sha256: str) -> dict | None:
    """The record of a probe set an earlier run of the same build committed (None: redo it)."""
    try:
        rec = json.loads(storage.read_bytes(probe_record_name(name)))
    except (CacheError, json.JSONDecodeError):
        return None
    if rec.get("config_sha256") != config_sha256 or storage.size(rec.get("file", "")) != rec.get(
            "bytes"):
        return None
    return rec


def commit_probe_set(storage: Storage, probe: ProbeTexts, acts: dict[str, torch.Tensor],
                     num_tokens: np.ndarray, config_sha256: str) -> dict:
    """Write a probe set's tensors then its record; returns the record."""
    from safetensors.torch import save

    tensors = {act_key(h): a.contiguous() for h, a in acts.items()}
    tensors["label"] = torch.from_numpy(probe.labels.astype(np.int64))
    tensors["part"] = torch.from_numpy(probe.parts.astype(np.int8))
    tensors["source_row"] = torch.from_numpy(probe.rows.astype(np.int64))
    tensors["num_tokens"] = torch.from_numpy(num_tokens.astype(np.int32))
    data = save(tensors, metadata={"name": probe.name})
    stem = probe_file_name(probe.name)
    file = f"{PROBE_FOLDER}{stem}.safetensors"
    storage.write_atomic(file, data)
    record = {
        "name": probe.name, "source": probe.source, "classes": list(probe.classes),
        "file": file, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "hooks": list(acts), "num_texts": int(len(probe.labels)),
        "num_tokens": int(num_tokens.sum()),
        "parts": {p: int((probe.parts == i).sum()) for i, p in enumerate(PARTS)},
        "positives": {p: int(probe.labels[probe.parts == i].sum()) for i, p in enumerate(PARTS)},
        "config_sha256": config_sha256,
    }
    storage.write_atomic(probe_record_name(probe.name), json.dumps(record).encode())
    return record


def build_probe_sets(spec: ProbesSpec, probes: list[ProbeTexts], model, hooks: list[str], *,
                     storage: Storage, config_sha256: str, prepend_bos: bool, batch_size: int,
                     progress) -> dict:
    """Compute and commit every probe set not yet committed; the manifest's ``probes`` entry.
    ``progress(total, initial)`` opens a progress bar (a context manager with ``update``)."""
    tok = model.tokenizer
    bos = getattr(tok, "bos_token_id", None) if prepend_bos else None
    pad = getattr(tok, "pad_token_id", None)
    pad = int(pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0))
    n_ctx = int(model.cfg.n_ctx)
    if spec.max_text_tokens > n_ctx:
        raise CacheInputError(f"CacheConfig.probes.max_text_tokens: {spec.max_text_tokens} is "
                              f"longer than the model's context n_ctx={n_ctx}")
    records: dict[str, dict] = {}
    todo = []
    for probe in probes:
        rec = committed_probe_set(storage, probe.name, config_sha256)
        if rec is None:
            todo.append(probe)
        else:
            records[probe.name] = rec
    if records:
        log.info("probes: %d of %d sets already committed", len(records), len(probes))
    if todo:
        ids = {p.name: tokenize_probe_texts(tok, p.texts, max_tokens=spec.max_text_tokens,
                                            bos_token_id=bos) for p in todo}
        total = sum(int(sum(len(t) for t in v)) for v in ids.values())
        with progress(total, 0) as bar:
            for probe in todo:
                acts = pooled_activations(model, ids[probe.name], hooks, batch_size=batch_size,
                                          pad_id=pad, on_batch=bar.update)
                counts = np.asarray([len(t) for t in ids[probe.name]])
                records[probe.name] = commit_probe_set(storage, probe, acts, counts,
                                                       config_sha256)
    sets = {}
    for probe in probes:  # in the config's order
        rec = dict(records[probe.name])
        rec.pop("config_sha256", None)
        sets[probe.name] = rec
    return {"pooling": POOLING, "max_text_tokens": spec.max_text_tokens,
            "prepend_bos": bos is not None, "sets": sets}
