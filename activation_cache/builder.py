"""build_cache: run the model over the corpus once and write a sharded, verified cache.

What one build does:

1. **Check the output.** ``build.json`` (the config and the model identity) is written before any
   shard. Over an existing cache built from a different config, or with a different model, the
   build stops with :class:`CacheExistsError` unless ``overwrite=True`` (which deletes the old
   cache's files first). A folder that is not a cache, or a cache holding other files too, is
   refused even with ``overwrite``: nothing a build did not write is ever deleted. A finished
   cache with the same config is returned as is.
2. **Plan.** The corpus is tokenized into windows (train/val/test split by document), each
   split's windows put in rank order (a hash of the seed, the document id and the window's
   number: :mod:`.window_sampling`) and, under ``max_tokens``, cut to the leading windows of each
   split's budget -- a sample across all of its documents. Each split's windows are then cut
   into shards of consecutive windows. The plan depends only on the config, so a rerun produces
   the same shard boundaries.
3. **Run.** Shards that are not yet committed are computed -- one model pass per batch of
   windows through ``run_with_cache`` (only the stored hooks; ``stop_at_layer`` after the last
   hooked block when no logits are needed) -- and written by a background thread while the next
   shard computes. Each shard commits as three files: its tensors (``shards/NAME.safetensors``),
   its per-token index (``index/NAME.parquet``), and last its record (``parts/NAME.json``, with
   sizes and sha256 checksums); every file is written atomically (see :mod:`.storage`).
4. **Commit.** When every shard has a record, the records are merged into ``manifest.json``,
   written last: a cache without a manifest is unfinished, and the reader refuses it.

**Resume.** After a kill at any moment (even SIGKILL mid-shard), rerunning the same build redoes
only the shards without a record: the finished cache holds exactly the windows of an
uninterrupted build, none twice, none missing (the computation is deterministic per shard). An
unfinished build started in an older cache format (``build.json``'s version) is refused, since
its shards hold other windows; a finished cache of an older format is reused as it is, and its
summary says which format it is.

**Scale-out.** With ``num_workers > 1`` the shards are split into contiguous, disjoint slices over
Ray actors (each loads the model once and writes its own shards to the shared storage -- a local
path for a local Ray, an object store URI on a cluster); the driver then merges the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from typing import Any

import numpy as np
import torch

from .cache_config import CacheConfig
from .cache_errors import CacheError, CacheExistsError, CacheInputError, CorruptCacheError
from .corpus import load_corpus, split_documents
from .hook_names import HookNameError, check_hook_name
from .manifest import (FORMAT, MANIFEST, SPLITS, VERSION, WINDOW_ORDER, canonical_json,
                       config_digest, describe_window_order, read_manifest, write_manifest)
from .model_loading import config_hook_names, load_model
from .model_spec import model_identity
from .probe_writer import PROBE_FOLDER, build_probe_sets
from .probes import ProbeError, load_probe_texts
from .progress import progress_bar
from .shard_writer import (TORCH_DTYPES, Layout, ShardWriter, SyntheticShardWriter, Unit,
                           Windows, make_layout)
from .synthetic import GROUND_TRUTH_FILE, ground_truth
from .storage import TEMP_MARKER, Storage
from .window_sampling import prefix_for_budget, rank_order, split_budgets
from .windowed import WindowedTextDataset

log = logging.getLogger("activation_cache")

BUILD_FILE = "build.json"


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


def windows_per_shard(cfg: CacheConfig, layout: Layout) -> int:
    if cfg.shard_tokens is not None:
        return max(1, cfg.shard_tokens // layout.seq_len)
    size = torch.finfo(TORCH_DTYPES[layout.act_dtype]).bits // 8
    per_pos = sum(layout.d_in.values()) * size + 4 + 2
    if layout.logits_k:
        per_pos += layout.logits_k * 8 + 8
    return max(1, int(cfg.shard_mb * 1e6 // (per_pos * layout.seq_len + 16)))


def plan_units(windows: dict[str, Windows], per_shard: int) -> list[Unit]:
    units = []
    for split in SPLITS:
        if split not in windows:
            continue  # a caller's windows without that split (e.g. no test split)
        n = len(windows[split])
        for i, start in enumerate(range(0, n, per_shard)):
            units.append(Unit(split, i, start, min(n, start + per_shard)))
    return units


# --------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------


def build_cache(cfg: CacheConfig, *, overwrite: bool = False, num_workers: int = 1,
                address: str | None = None) -> str:
    """Build (or resume building) the cache described by ``cfg``; returns its path or URI."""
    if not isinstance(num_workers, int) or num_workers < 1:
        raise CacheError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    storage = Storage(cfg.output)
    if not overwrite and _check_existing(cfg, storage, overwrite=False):
        manifest = read_manifest(storage)
        log.log(logging.INFO if manifest["version"] == VERSION else logging.WARNING,
                "%s (already complete, nothing to do)", describe_cache(manifest, storage.uri))
        return storage.uri  # checked before loading the model: a finished cache is instant
    if cfg.synthetic is not None:  # generated activations: no model, no corpus
        return build_synthetic(cfg, storage=storage, overwrite=overwrite)
    # what can be checked without the model is checked before it loads (seconds, not minutes)
    documents = load_corpus(cfg.corpus)
    probes = read_probe_texts(cfg)
    check_hooks_from_config(cfg)
    model = load_model(cfg.model)
    identity = model_identity(model, cfg.model)
    windows = make_windows(cfg, model, documents)
    return build_from_windows(cfg, model, identity, windows, storage=storage,
                              overwrite=overwrite, num_workers=num_workers, address=address,
                              probes=probes)


def read_probe_texts(cfg: CacheConfig) -> list | None:
    """The probe sets' texts (cfg.probes), read before the model loads (one-line errors)."""
    if cfg.probes is None:
        return None
    try:
        return load_probe_texts(cfg.probes)
    except ProbeError as exc:
        raise CacheInputError(f"CacheConfig.probes: {exc}") from None


CACHE_FOLDERS = ("shards/", "index/", "parts/", PROBE_FOLDER)
"""Where a cache's own files live (besides MANIFEST and BUILD_FILE at the top)."""


def is_cache_file(rel: str) -> bool:
    """Whether ``rel`` (relative to a cache root) is a name a build writes."""
    if rel in (MANIFEST, BUILD_FILE, GROUND_TRUTH_FILE):
        return True
    return any(rel.startswith(p) and "/" not in rel[len(p):] for p in CACHE_FOLDERS)


def _written_by_us(storage: Storage) -> bool:
    """Whether the build marker (``build.json``, or ``manifest.json`` of a cache from before
    it) says sae-sweep wrote this cache."""
    for name in (BUILD_FILE, MANIFEST):
        if storage.exists(name):
            try:
                data = json.loads(storage.read_bytes(name))
            except (CacheError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and data.get("format") == FORMAT:
                return True
    return False


def _check_existing(cfg: CacheConfig, storage: Storage, overwrite: bool) -> bool:
    """Refuse a different config (unless overwrite) and anything that is not our cache (always);
    True when the same cache is complete.

    ``overwrite`` replaces only a cache (its ``build.json`` / ``manifest.json`` say sae-sweep
    wrote it) holding nothing but a cache's own files; a folder holding anything else is
    refused and nothing in it is touched (local folders and object-store prefixes alike)."""
    where = storage.describe("")
    if not storage.is_file_or_missing():
        raise CacheExistsError(f"{where}: is a file, not a folder; choose another output")
    files = storage.list("")
    if not storage.exists(BUILD_FILE) and not storage.exists(MANIFEST):
        if files:
            raise CacheExistsError(
                f"{where}: not empty and not a cache ({files[0]} ...); nothing was changed; "
                "choose another output (--overwrite replaces only a cache)")
        return False
    if not _written_by_us(storage):
        raise CacheExistsError(
            f"{where}: its {BUILD_FILE if storage.exists(BUILD_FILE) else MANIFEST} was not "
            "written by sae-sweep (not a cache); nothing was changed; choose another output")
    foreign = [rel for rel in files
               if not is_cache_file(rel.split(TEMP_MARKER, 1)[0] if TEMP_MARKER in rel else rel)]
    if overwrite:
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CacheExistsError(
                f"{where}: holds files that are not part of a cache ({shown}); --overwrite "
                "replaces only a cache's own files, so nothing was changed; move them away or "
                "choose another output")
        log.info("overwrite: removing the existing cache at %s", storage.uri)
        _delete_cache(storage, files)
        return False
    try:
        previous = json.loads(storage.read_bytes(BUILD_FILE))["config"]
    except (CacheError, KeyError, json.JSONDecodeError, TypeError):
        previous = read_manifest(storage)["config"]
    if canonical_json(previous) != canonical_json(cfg.to_dict()):
        diff = sorted(k for k in set(previous) | set(cfg.to_dict())
                      if canonical_json(previous.get(k)) != canonical_json(cfg.to_dict().get(k)))
        raise CacheExistsError(
            f"{storage.describe(BUILD_FILE)}: the cache there was built from a different config "
            f"(differs in: {', '.join(diff)}); use another output or overwrite (--overwrite)"
        )
    if storage.exists(MANIFEST):
        return True  # a finished cache of an older format stays readable (its summary says so)
    started_in = _build_version(storage)
    if started_in != VERSION:
        raise CacheExistsError(
            f"{storage.describe(BUILD_FILE)}: this unfinished cache was started in cache format "
            f"{started_in} ({WINDOW_ORDER.get(started_in, 'another window order')}), which this "
            f"version cannot finish (it writes format {VERSION}, "
            f"{WINDOW_ORDER[VERSION]}); use another output or overwrite (--overwrite)")
    return False


def _build_version(storage: Storage) -> Any:
    """The cache format an unfinished build was started in (``build.json``'s version)."""
    try:
        return json.loads(storage.read_bytes(BUILD_FILE)).get("version")
    except (CacheError, json.JSONDecodeError, AttributeError):
        return None


def _delete_cache(storage: Storage, files: list[str]) -> None:
    """Delete a cache's own files (checked by the caller): the manifest first, so that a kill
    midway leaves an unfinished cache, never a corrupt finished one; build.json last."""
    order = sorted(files, key=lambda rel: (rel != MANIFEST, rel == BUILD_FILE, rel))
    for rel in order:
        storage.delete(rel)
    storage.remove_empty_folders()


def build_from_windows(cfg: CacheConfig, model, identity: dict, windows: dict[str, Windows], *,
                       storage: Storage | None = None, overwrite: bool = False,
                       num_workers: int = 1, address: str | None = None,
                       probes: list | None = None) -> str:
    """The build after the model is loaded and the corpus windowed (see module doc); then the
    probe sets (``probes``: their texts, default read from ``cfg.probes``)."""
    storage = storage or Storage(cfg.output)
    if _check_existing(cfg, storage, overwrite):
        return storage.uri
    started = time.time()
    tok = getattr(model, "tokenizer", None)
    ids = (getattr(tok, "bos_token_id", None), getattr(tok, "pad_token_id", None))
    layout = make_layout(cfg, model, ids)
    full, windows = windows, _cap_tokens(windows, cfg)
    _warn_few_documents(full, windows, cfg)
    if len(windows["train"]) == 0:
        raise CacheInputError(
            f"CacheConfig.corpus: the corpus gives no training windows (empty documents, or "
            f"every document went to val/test with val_fraction={cfg.val_fraction}, "
            f"test_fraction={cfg.test_fraction})"
        )
    build_info = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "model": identity}
    if storage.exists(BUILD_FILE):
        old = json.loads(storage.read_bytes(BUILD_FILE))
        if canonical_json(old.get("model")) != canonical_json(identity):
            raise CacheExistsError(
                f"{storage.describe(BUILD_FILE)}: this unfinished cache was started with another "
                "model (its identity differs); use another output or overwrite (--overwrite)"
            )
    else:
        storage.write_atomic(BUILD_FILE, json.dumps(build_info, indent=1).encode())
    removed = storage.remove_temporaries(owned=is_cache_file)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted build", removed)

    units = plan_units(windows, windows_per_shard(cfg, layout))
    done = {u.name for u in units if _committed(storage, u, layout)}
    todo = [u for u in units if u.name not in done]
    total = sum(int(windows[u.split].attention_mask[u.start:u.stop].sum()) for u in units)
    remaining = sum(int(windows[u.split].attention_mask[u.start:u.stop].sum()) for u in todo)
    if done:
        log.info("resuming: %d of %d shards already committed", len(done), len(units))
    with progress_bar(total, initial=total - remaining, unit="tok", unit_scale=True,
                      desc="caching activations", emit=log.info) as bar:
        if num_workers > 1 and len(todo) > 1:
            _run_ray(cfg, identity, layout, windows, todo, storage, num_workers, address, bar)
        else:
            _run_local(ShardWriter(model, layout, storage, cfg.batch_size), windows, todo, bar)

    records = [_read_record(storage, u) for u in units]
    manifest = _manifest(cfg, identity, layout, windows, records, storage)
    if cfg.probes is not None:
        if probes is None:
            probes = read_probe_texts(cfg)
        probe_started = time.time()

        def bar(total, initial):
            return progress_bar(total, initial=initial, unit="tok", unit_scale=True,
                                desc="caching probe activations", emit=log.info)

        manifest["probes"] = build_probe_sets(
            cfg.probes, probes, model, list(layout.hooks), storage=storage,
            config_sha256=layout.config_sha256, prepend_bos=cfg.prepend_bos,
            batch_size=max(8, cfg.batch_size), progress=bar)
        manifest["probes"]["build_seconds"] = round(time.time() - probe_started, 3)
        manifest["total_bytes"] += sum(r["bytes"] for r in manifest["probes"]["sets"].values())
    manifest["build_seconds"] = round(time.time() - started, 3)
    write_manifest(storage, manifest)
    log.info("%s", describe_cache(manifest, storage.uri, tokens_built=remaining))
    return storage.uri


def build_synthetic(cfg: CacheConfig, *, storage: Storage | None = None,
                    overwrite: bool = False) -> str:
    """Build (or resume) a synthetic cache (``cfg.synthetic``; activation_cache/synthetic.py):
    the same files, checks, resume and manifest as a model's cache, with activations generated
    from known sparse features, no logits, and the truth in ``ground_truth.safetensors``
    (sha256 in the manifest's ``synthetic`` entry)."""
    from safetensors.torch import save

    storage = storage or Storage(cfg.output)
    if _check_existing(cfg, storage, overwrite):
        return storage.uri
    started = time.time()
    spec, hook, seq_len = cfg.synthetic, cfg.hooks[0], cfg.max_text_length
    truth = ground_truth(spec, hook)
    n_windows = -(-spec.num_tokens // seq_len)
    n_val = int(round(n_windows * cfg.val_fraction))
    n_test = int(round(n_windows * cfg.test_fraction))
    n_train = n_windows - n_val - n_test
    if n_train < 1:
        raise CacheInputError(
            f"CacheConfig.synthetic.num_tokens: {spec.num_tokens} tokens make {n_windows} "
            f"window(s) of {seq_len}, none left for training after val/test; raise num_tokens")
    windows, start = {}, 0
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        if n == 0 and split != "train":
            continue
        windows[split] = Windows(np.zeros((n, seq_len), dtype=np.int64),
                                 np.ones((n, seq_len), dtype=bool),
                                 np.arange(start, start + n, dtype=np.int64))
        start += n
    layout = Layout(hooks=[hook], stored_hooks=[hook], splice_hooks={}, d_in={hook: spec.d},
                    seq_len=seq_len, act_dtype=cfg.dtype, stop_at_layer=None, logits_k=None,
                    d_vocab=0, bos_token_id=None, pad_token_id=None, exclude_bos=False,
                    exclude_token_ids=[], config_sha256=config_digest(cfg.to_dict()))
    identity = {"name": "synthetic", "source": "synthetic", "d_model": spec.d, "n_layers": 0,
                "hook_names": [hook]}
    if not storage.exists(BUILD_FILE):
        storage.write_atomic(BUILD_FILE, json.dumps(
            {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "model": identity},
            indent=1).encode())
    storage.remove_temporaries(owned=is_cache_file)
    units = plan_units(windows, windows_per_shard(cfg, layout))
    todo = [u for u in units if not _committed(storage, u, layout)]
    if len(todo) < len(units):
        log.info("resuming: %d of %d shards already committed", len(units) - len(todo),
                 len(units))
    total = n_windows * seq_len
    remaining = sum((u.stop - u.start) * seq_len for u in todo)
    with progress_bar(total, initial=total - remaining, unit="tok", unit_scale=True,
                      desc="generating activations", emit=log.info) as bar:
        _run_local(SyntheticShardWriter(spec, truth, layout, storage), windows, todo, bar)
    data = save(truth.tensors(), metadata={"hook": hook})
    storage.write_atomic(GROUND_TRUTH_FILE, data)
    records = [_read_record(storage, u) for u in units]
    manifest = _manifest(cfg, identity, layout, windows, records, storage)
    manifest["synthetic"] = {
        "hook": hook, "spec": spec.to_dict(),
        "ground_truth": {"file": GROUND_TRUTH_FILE, "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()}}
    manifest["total_bytes"] += len(data)
    manifest["build_seconds"] = round(time.time() - started, 3)
    write_manifest(storage, manifest)
    log.info("%s", describe_cache(manifest, storage.uri, tokens_built=remaining))
    return storage.uri


def describe_cache(manifest: dict, uri: str, *, tokens_built: int | None = None) -> str:
    """What a cache holds, one short line each: where and its size; tokens, windows, documents
    and shards per split; the hooks; the build time (with ``tokens_built``, the tokens this run
    computed, its throughput). What ``sae-sweep cache`` prints at the end."""
    splits = manifest.get("splits", {})
    lines = []
    for name, info in splits.items():
        shards, docs = len(info.get("shards", [])), info.get("num_documents", "?")
        lines.append(f"  {name} {info['num_tokens']:,} tokens ({info['num_sequences']:,} windows, "
                     f"{docs} document{'' if docs == 1 else 's'}, {shards} shard"
                     f"{'' if shards == 1 else 's'})")
    extras = [x for x, on in (("clean logits", manifest.get("logits")),
                              ("splice residual", manifest.get("splice_hooks"))) if on]
    for hook in manifest.get("hooks", []):
        lines.append(f"  {hook} (d {manifest['d_in'][hook]}) as {manifest.get('act_dtype')}"
                     + (f" + {', '.join(extras)}" if extras else ""))
    synthetic = manifest.get("synthetic")
    if synthetic:
        spec = synthetic["spec"]
        lines.append(f"  synthetic: {spec['n_features']} known features in {spec['d']} "
                     f"dimensions, ~{spec['mean_active']:g} active per token (seed "
                     f"{spec['seed']}); ground truth in {synthetic['ground_truth']['file']}")
    probes = manifest.get("probes")
    if probes:
        sets = probes["sets"].values()
        parts = {p: sum(r["parts"][p] for r in sets) for p in ("train", "val", "test")}
        lines.append(f"  probes: {len(probes['sets'])} sets, {sum(r['num_texts'] for r in sets):,}"
                     f" texts (train/val/test {parts['train']}/{parts['val']}/{parts['test']}),"
                     f" {probes['pooling']} of each"
                     + (f", {probes['build_seconds']:.1f} s" if probes.get("build_seconds")
                        else ""))
    seconds = manifest.get("build_seconds")
    speed = (f" ({tokens_built:,} tokens, {tokens_built / seconds:,.0f} tokens/s)"
             if seconds and tokens_built else "")
    head = f"cache {uri}: {_size(manifest.get('total_bytes', 0))}"
    built = [f"  built in {seconds:.1f} s{speed}"] if seconds else []
    older = ([] if manifest.get("version") == VERSION else
             [f"  {describe_window_order(manifest)}: max_tokens kept each split's first "
              "documents (rebuild with --overwrite for windows sampled across documents)"])
    return "\n".join([head, *lines, *built, *older])


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _cap_tokens(windows: dict[str, Windows], cfg: CacheConfig) -> dict[str, Windows]:
    """Under ``max_tokens``, each split's leading windows up to its budget (the windows are in
    rank order, so these are sampled across its documents: see :mod:`.window_sampling`)."""
    if cfg.max_tokens is None:
        return windows
    budgets = split_budgets(cfg.max_tokens, cfg.val_fraction, cfg.test_fraction)
    return {split: w.take(0, prefix_for_budget(w.attention_mask.sum(axis=1), budgets[split]))
            for split, w in windows.items()}


def _committed(storage: Storage, unit: Unit, layout: Layout) -> bool:
    try:
        rec = json.loads(storage.read_bytes(f"parts/{unit.name}.json"))
    except (CacheError, json.JSONDecodeError):
        return False
    return (rec.get("config_sha256") == layout.config_sha256
            and rec.get("first_sequence") == unit.start
            and rec.get("num_sequences") == unit.stop - unit.start
            and storage.size(rec["file"]) == rec["bytes"]
            and storage.size(rec["index_file"]) == rec["index_bytes"])


def _read_record(storage: Storage, unit: Unit) -> dict:
    try:
        rec = json.loads(storage.read_bytes(f"parts/{unit.name}.json"))
    except CacheError:
        raise CorruptCacheError(f"{storage.describe(f'parts/{unit.name}.json')}: shard "
                                f"{unit.name} was not committed by any worker") from None
    rec.pop("config_sha256", None)
    return rec


def _run_local(writer: ShardWriter, windows: dict[str, Windows], todo: list[Unit], bar) -> None:
    """Compute shards in this process; a background thread writes the previous one meanwhile."""
    pending: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def write_loop() -> None:
        while True:
            item = pending.get()
            if item is None:
                return
            if failure:
                continue
            try:
                writer.commit(*item)
            except BaseException as exc:  # re-raised in the main thread
                failure.append(exc)

    thread = threading.Thread(target=write_loop, name="cache-writer", daemon=True)
    thread.start()
    try:
        for unit in todo:
            if failure:
                break
            tensors = writer.compute(unit, windows[unit.split].take(unit.start, unit.stop),
                                     on_batch=bar.update)
            pending.put((unit, tensors))
    finally:
        pending.put(None)
        thread.join()
    if failure:
        raise failure[0]


def _run_ray(cfg: CacheConfig, identity: dict, layout: Layout, windows: dict[str, Windows],
             todo: list[Unit], storage: Storage, num_workers: int, address: str | None,
             bar) -> None:
    """Split ``todo`` into contiguous disjoint slices over Ray actors; wait for all shards."""
    import ray

    we_started = not ray.is_initialized()
    if we_started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kwargs["num_cpus"] = num_workers
        ray.init(address=address, **kwargs)
    actor_cls = ray.remote(num_cpus=1)(_RayShardWorker)
    n = min(num_workers, len(todo))
    actors = [actor_cls.remote(cfg.to_dict(), identity, layout.to_dict()) for _ in range(n)]
    try:
        refs: dict[Any, int] = {}
        for i, actor in enumerate(actors):
            for unit in todo[i * len(todo) // n:(i + 1) * len(todo) // n]:
                w = windows[unit.split].take(unit.start, unit.stop)
                ref = actor.build.remote(unit.__dict__, w.tokens, w.attention_mask, w.doc_id)
                refs[ref] = int(w.attention_mask.sum())
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, CacheError):
                    raise cause from None
                raise
            bar.update(refs[ready[0]])
    finally:
        for actor in actors:
            ray.kill(actor)
        if we_started:
            ray.shutdown()


class _RayShardWorker:
    """A Ray actor: loads the model once, then builds the shards it is given."""

    def __init__(self, cfg_dict: dict, identity: dict, layout_dict: dict):
        torch.set_num_threads(1)
        cfg = CacheConfig.from_dict(cfg_dict)
        model = load_model(cfg.model)
        if canonical_json(model_identity(model, cfg.model)) != canonical_json(identity):
            raise CacheInputError(
                f"CacheConfig.model: a Ray worker loaded a different model than the driver "
                f"({identity.get('name')}); every node must see the same model file"
            )
        self.writer = ShardWriter(model, Layout(**layout_dict), Storage(cfg.output), cfg.batch_size)

    def build(self, unit: dict, tokens: np.ndarray, attention_mask: np.ndarray,
              doc_id: np.ndarray) -> str:
        u = Unit(**unit)
        self.writer.build(u, Windows(tokens, attention_mask, doc_id))
        return u.name


def _manifest(cfg: CacheConfig, identity: dict, layout: Layout, windows: dict[str, Windows],
              records: list[dict], storage: Storage) -> dict:
    first = records[0]
    tensors = {name: {"dtype": e["dtype"], "shape": e["shape"][1:]}
               for name, e in first["tensors"].items()}
    splits = {}
    for split in SPLITS:
        shards = [r for r in records if r["split"] == split]
        if not shards:
            continue  # an empty split (its fraction 0, or too few documents) is left out
        splits[split] = {
            "num_sequences": sum(r["num_sequences"] for r in shards),
            "num_tokens": sum(r["num_tokens"] for r in shards),
            "num_train_tokens": sum(r["num_train_tokens"] for r in shards),
            "num_documents": int(len(np.unique(windows[split].doc_id))),
            "shards": shards,
        }
    n_tokens = sum(s["num_tokens"] for s in splits.values())
    per_item: dict[str, float] = {}
    for r in records:
        for name, e in r["tensors"].items():
            per_item[name] = per_item.get(name, 0) + e["bytes"]
        per_item["index (parquet)"] = per_item.get("index (parquet)", 0) + r["index_bytes"]
    bytes_per_token = {k: round(v / max(1, n_tokens), 3) for k, v in per_item.items()}
    total_bytes = sum(r["bytes"] + r["index_bytes"] for r in records)
    bytes_per_token["total"] = round(total_bytes / max(1, n_tokens), 3)
    return {
        "format": FORMAT, "version": VERSION, "window_order": WINDOW_ORDER[VERSION],
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.to_dict(), "config_sha256": layout.config_sha256, "model": identity,
        "hooks": layout.hooks, "stored_hooks": layout.stored_hooks,
        "splice_hooks": layout.splice_hooks, "d_in": layout.d_in, "seq_len": layout.seq_len,
        "act_dtype": layout.act_dtype,
        "logits": None if layout.logits_k is None else {
            "k": layout.logits_k, "d_vocab": layout.d_vocab,
            "full": layout.logits_k == layout.d_vocab},
        "excluded": {"padding": True, "bos": layout.exclude_bos,
                     "bos_token_id": layout.bos_token_id, "pad_token_id": layout.pad_token_id,
                     "token_ids": layout.exclude_token_ids},
        "tensors": tensors, "splits": splits, "bytes_per_token": bytes_per_token,
        "total_bytes": total_bytes,
    }


# --------------------------------------------------------------------------------------------
# corpus -> windows (C1's corpus and windowing code)
# --------------------------------------------------------------------------------------------


def check_hooks_from_config(cfg: CacheConfig) -> None:
    """Check ``cfg.hooks`` against the model's configuration alone (no weights): a typo gets
    its close matches or the valid layer range before the model loads. A model whose
    configuration cannot be read that way is checked after it loads (:func:`make_layout`)."""
    found = config_hook_names(cfg.model)
    if found is None:
        return
    names, n_layers = found
    for hook in cfg.hooks:
        try:
            check_hook_name(hook, names, n_layers)
        except HookNameError as exc:
            raise CacheInputError(f"CacheConfig.hooks: {exc}") from None


FEW_DOCUMENTS = 5
"""A split with fewer documents than this gets a warning: its statistics rest on a handful of
texts (e.g. a corpus of a few long novels)."""


def make_windows(cfg: CacheConfig, model, documents: list | None = None) -> dict[str, Windows]:
    """Tokenize the corpus (``documents``, default: loaded from ``cfg.corpus``) into windows,
    split by document into train, val and test, each split's windows in rank order (a hash of
    ``cfg.seed``, the document id and the window's number in it; see :mod:`.window_sampling`),
    so that ``max_tokens``, which keeps each split's leading windows, samples across documents.

    ``doc_id`` of a window is the index of its document in the whole corpus (as loaded).
    """
    documents = load_corpus(cfg.corpus) if documents is None else documents
    if not documents:
        raise CacheInputError("CacheConfig.corpus: the corpus has no documents")
    number = {d.doc_id: i for i, d in enumerate(documents)}
    parts = dict(zip(SPLITS, split_documents(documents, cfg.val_fraction, cfg.seed,
                                             test_fraction=cfg.test_fraction)))
    out = {}
    for split, docs in parts.items():
        ds = WindowedTextDataset(docs, model.tokenizer, cfg.max_text_length, cfg.prepend_bos,
                                 exclude_bos=cfg.exclude_bos,
                                 exclude_token_ids=cfg.exclude_token_ids,
                                 n_ctx=int(model.cfg.n_ctx), show_progress=len(docs) > 50)
        global_ids = np.asarray([number[d.doc_id] for d in docs], dtype=np.int64)
        local = ds.doc_ids.numpy()
        order = rank_order([d.doc_id for d in docs], local, cfg.seed)
        doc = global_ids[local[order]] if len(ds) else np.zeros(0, dtype=np.int64)
        out[split] = Windows(ds.tokens.numpy()[order], ds.attention_mask.numpy()[order], doc)
    return out


def _warn_few_documents(full: dict[str, Windows], kept: dict[str, Windows],
                        cfg: CacheConfig) -> None:
    """Warn about a split whose windows come from fewer than FEW_DOCUMENTS documents (its
    statistics rest on a handful of texts), or a missing validation split."""
    for split in SPLITS:
        if split not in full or split not in kept:
            continue
        n_full = len(np.unique(full[split].doc_id))
        n_kept = len(np.unique(kept[split].doc_id))
        if split == "val" and n_full == 0 and cfg.val_fraction > 0:
            log.warning("CacheConfig.corpus: one document, so no validation split (the split is "
                        "by document)\n  sweeps need one: add documents or split the text into "
                        "several files")
        elif 0 < n_kept < FEW_DOCUMENTS:
            why = (f"max_tokens keeps {kept[split].attention_mask.sum():,} of its tokens, "
                   f"sampled from {n_kept} of its {n_full} documents; raise max_tokens for more"
                   if n_kept < n_full else
                   "add documents or split long texts into several files")
            log.warning("CacheConfig.corpus: the %s split comes from only %d document%s: its "
                        "statistics may not generalise\n  (%s)", split, n_kept,
                        "" if n_kept == 1 else "s", why)
