"""CacheConfig: everything that decides what an activation cache contains and where it lives.

Two builds with equal configs produce the same cache; a build over an existing cache with a
different config is refused unless ``overwrite`` is given (``sae-sweep cache --overwrite``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .corpus import CorpusSpec
from .model_spec import ModelSpec
from .strict_config import StrictConfig, is_int
from .probes import ProbesSpec
from .synthetic import SyntheticSpec

STORAGE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class CacheConfig(StrictConfig):
    """What to cache: model, corpus, hooks, windows, exclusions, storage and end-to-end extras."""

    output: str = "runs/cache"
    """Where the cache goes: a local folder, or a pyarrow filesystem URI such as
    ``s3://bucket/prefix`` (pyarrow query options allowed, e.g. ``?endpoint_override=host:port``;
    credentials come from the environment)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """Which model to run (see :class:`ModelSpec`); its identity is recorded in the manifest."""

    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    """Which text to run it on (see :class:`CorpusSpec`); default: the built-in Shakespeare."""

    hooks: tuple[str, ...] = ("blocks.6.hook_resid_post",)
    """transformer_lens hook names whose activations are stored (one or more; one model pass)."""

    max_text_length: int = 128
    """Tokens per window (BOS included); must not exceed the model's context ``n_ctx``."""

    prepend_bos: bool = True
    """Start every window with the tokenizer's BOS token."""

    exclude_bos: bool = True
    """Leave BOS tokens out of ``train_mask`` (their huge norm eats BatchTopK's budget).
    Padding is always excluded."""

    exclude_token_ids: tuple[int, ...] = ()
    """Further token ids to leave out of ``train_mask`` (e.g. other special tokens)."""

    val_fraction: float = 0.1
    """Fraction of documents held out as the ``val`` split (split by document, not window):
    what selection uses (a sweep's objective, early stopping, ``save_best``)."""
    test_fraction: float = 0.1
    """Fraction of documents held out as the ``test`` split (by document, disjoint from val):
    what reported figures use (a sweep trial's final record, ``best``, the export card,
    ``sae-sweep eval``); nothing tunes on it. 0: no test split."""

    seed: int = 0
    """Seed of the train/val/test document split and of the windows' rank order (which windows
    ``max_tokens`` keeps)."""

    batch_size: int = 8
    """Windows per model forward pass while building."""

    dtype: str = "float16"
    """Storage dtype of activations: float32, float16 or bfloat16 (read back as float32)."""

    shard_tokens: int | None = 16384
    """Target token slots (windows x max_text_length) per shard file; set this or shard_mb.
    Smaller shards mix better: the reader's shuffle buffer permutes tokens drawn from several
    randomly chosen shards at once (about 256 MiB of float32 rows by default)."""

    shard_mb: float | None = None
    """Target shard size in MB (10^6 bytes) instead of shard_tokens."""

    store_logits: bool = False
    """Store the clean next-token distribution (compact, see logits_top_k) and
    ``clean_next_token_logprob``, for end-to-end (KL) losses. Needs the full forward pass."""

    logits_top_k: int | None = 64
    """How many clean log-probs to keep per token (with their ids and the logsumexp);
    null stores the full log-probs (only for vocabularies of at most 8192 tokens)."""

    store_splice_residual: bool | None = None
    """Also store ``blocks.{L}.hook_resid_pre`` of each hook's block (where an end-to-end pass
    restarts the model); deduplicated when it is itself a hook. null: same as store_logits."""

    max_tokens: int | None = None
    """Cap on real tokens cached, split between train, val and test in proportion to their
    fractions; each split keeps windows sampled across all of its documents (the lowest-ranked
    by a hash of seed, document id and window number: deterministic, and stable when documents
    are added). null: all."""

    synthetic: SyntheticSpec | None = None
    """Generate the activations from known sparse features instead of running a model
    (activation_cache/synthetic.py): no model, no corpus, no logits; one hook (its name is
    free, e.g. ``synthetic``); ``max_text_length`` tokens per window, ``val_fraction`` /
    ``test_fraction`` of the windows held out, the truth stored with the cache."""

    probes: ProbesSpec | None = None
    """Labelled texts whose last-token activations are stored for sparse probing
    (activation_cache/probes.py): sae-probes datasets and/or a user's files; null: none."""

    def validate(self) -> None:
        self._require(isinstance(self.output, str) and self.output.strip() != "", "output",
                      "must be a folder path or a URI, got an empty value")
        self._require(isinstance(self.hooks, (tuple, list)) and len(self.hooks) > 0, "hooks",
                      "give at least one hook name, e.g. blocks.6.hook_resid_post")
        for h in self.hooks:
            self._require(isinstance(h, str) and h.strip() != "", "hooks",
                          f"hook names must be non-empty strings, got {h!r}")
        dup = sorted({h for h in self.hooks if list(self.hooks).count(h) > 1})
        self._require(not dup, "hooks", f"listed more than once: {', '.join(dup)}")
        self._require(is_int(self.max_text_length) and self.max_text_length >= 2,
                      "max_text_length", f"must be an integer >= 2, got {self.max_text_length!r}")
        for t in self.exclude_token_ids:
            self._require(is_int(t) and t >= 0, "exclude_token_ids",
                          f"token ids must be integers >= 0, got {t!r}")
        self._require(isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1,
                      "val_fraction", f"must be in [0, 1), got {self.val_fraction!r}")
        self._require(isinstance(self.test_fraction, (int, float))
                      and 0 <= self.test_fraction < 1, "test_fraction",
                      f"must be in [0, 1), got {self.test_fraction!r}")
        self._require(self.val_fraction + self.test_fraction < 1, "test_fraction",
                      f"val_fraction + test_fraction must be < 1 (documents must remain for "
                      f"training), got {self.val_fraction} + {self.test_fraction}")
        self._require(is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        self._require(is_int(self.batch_size) and self.batch_size >= 1, "batch_size",
                      f"must be an integer >= 1, got {self.batch_size!r}")
        self._require(self.dtype in STORAGE_DTYPES, "dtype",
                      f"must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        self._require((self.shard_tokens is None) != (self.shard_mb is None), "shard_tokens",
                      "set exactly one of shard_tokens and shard_mb (the other to null)")
        if self.shard_tokens is not None:
            self._require(is_int(self.shard_tokens) and self.shard_tokens >= 1, "shard_tokens",
                          f"must be an integer >= 1, got {self.shard_tokens!r}")
        if self.shard_mb is not None:
            self._require(isinstance(self.shard_mb, (int, float)) and self.shard_mb > 0,
                          "shard_mb", f"must be > 0, got {self.shard_mb!r}")
        if self.logits_top_k is not None:
            self._require(is_int(self.logits_top_k) and self.logits_top_k >= 1, "logits_top_k",
                          f"must be an integer >= 1 or null (full), got {self.logits_top_k!r}")
        if self.max_tokens is not None:
            self._require(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
                          f"must be an integer >= 1 or null, got {self.max_tokens!r}")
        if self.synthetic is not None:
            self._require(len(self.hooks) == 1, "hooks",
                          "a synthetic cache stores one hook; name it, e.g. [synthetic]")
            self._require(self.max_tokens is None, "max_tokens",
                          "a synthetic cache generates synthetic.num_tokens; remove max_tokens")
            self._require(not self.store_logits and not self.store_splice_residual,
                          "store_logits", "a synthetic cache runs no model, so it has no "
                          "logits nor splice residuals; remove them")
            self._require(self.model == ModelSpec(), "model",
                          "a synthetic cache runs no model; remove `model:`")
            self._require(self.probes is None, "probes",
                          "a synthetic cache runs no model, so it has no probe sets; remove "
                          "`probes:`")
            self._require(self.corpus == CorpusSpec(), "corpus",
                          "a synthetic cache reads no text; remove `corpus:`")

    @property
    def splice_residual(self) -> bool:
        """Whether the splice residual is stored (store_splice_residual, defaulting to store_logits)."""
        return self.store_logits if self.store_splice_residual is None else self.store_splice_residual
