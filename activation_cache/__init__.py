"""activation_cache: text -> tokens -> hooked transformer_lens model -> sharded activation files.

Public API (everything else in this package is internal):

    UserError, ConfigError, StrictConfig   -- the project's error family and config base
    ModelSpec, load_model, model_identity, ModelLoadError
                                           -- which model; load it as a frozen HookedTransformer
    resolve_hook, check_hook_name, parse_block_hook, block_hook_name, BlockHook, HookNameError
                                           -- the hook-name grammar (blocks.{L}.{point}, friendly
                                              names, checks with "did you mean" suggestions)
    expand_hook_pattern                    -- several hooks: lists, {0..29..4} ranges, globs
    CorpusSpec, Document, load_corpus, split_documents, CorpusError
                                           -- which text; deterministic train/val split by document
    WindowedTextDataset, train_mask_for, WindowError
                                           -- tokenize once into windows with attention/train masks
    CacheConfig, build_cache               -- build (or resume) a sharded, verified activation cache
    SyntheticSpec, HierarchySpec, GroundTruth
                                           -- a synthetic cache: activations from known sparse
                                              features (`synthetic:`), its truth
                                              (CacheReader.ground_truth())
    ProbesSpec, ProbeFileSpec, ProbeSet, ProbeError, DEFAULT_PROBE_DATASETS
                                           -- probe sets (`probes:`): labelled texts whose
                                              last-token activations the cache stores
                                              (CacheReader.probe_sets(), probe_set(name))
    open_cache, CacheReader, SequenceBatch, CacheTokenSource, TokenBatch
                                           -- read it: shuffled token batches (input, target),
                                              whole windows
    compact_logprobs, compact_kl           -- compact clean next-token distributions and their KL
    progress_bar, LineProgress, is_terminal
                                           -- progress: a bar on a terminal, plain lines in a log
    CacheError, CacheExistsError, CorruptCacheError, CacheMismatchError, CacheInputError
"""

from .errors import UserError
from .progress import LineProgress, is_terminal, progress_bar
from .strict_config import ConfigError, StrictConfig
from .corpus import CorpusError, CorpusSpec, Document, load_corpus, split_documents
from .model_spec import ModelLoadError, ModelSpec, model_identity
from .model_loading import load_model
from .hook_names import (BlockHook, HookNameError, block_hook_name, check_hook_name,
                         expand_hook_pattern, parse_block_hook, resolve_hook)
from .windowed import WindowedTextDataset, WindowError, train_mask_for
from .cache_config import CacheConfig
from .probes import DEFAULT_PROBE_DATASETS, ProbeError, ProbeFileSpec, ProbeSet, ProbesSpec
from .synthetic import GroundTruth, HierarchySpec, SyntheticSpec
from .cache_errors import (CacheError, CacheExistsError, CacheInputError, CacheMismatchError,
                           CorruptCacheError)
from .builder import build_cache
from .reader import CacheReader, CacheTokenSource, SequenceBatch, open_cache
from .token_batch import TokenBatch
from .compact_logits import compact_kl, compact_logprobs

__all__ = ["UserError", "ConfigError", "StrictConfig", "progress_bar", "LineProgress",
           "is_terminal"]
__all__ += ["ModelSpec", "load_model", "model_identity", "ModelLoadError"]
__all__ += ["resolve_hook", "check_hook_name", "parse_block_hook", "block_hook_name", "BlockHook",
            "HookNameError", "expand_hook_pattern"]
__all__ += ["CorpusSpec", "Document", "load_corpus", "split_documents", "CorpusError"]
__all__ += ["WindowedTextDataset", "train_mask_for", "WindowError"]
__all__ += ["SyntheticSpec", "HierarchySpec", "GroundTruth"]
__all__ += ["CacheConfig", "build_cache", "open_cache", "CacheReader", "SequenceBatch",
            "CacheTokenSource", "TokenBatch", "compact_logprobs", "compact_kl", "CacheError",
            "CacheExistsError", "CorruptCacheError", "CacheMismatchError", "CacheInputError"]
__all__ += ["ProbesSpec", "ProbeFileSpec", "ProbeSet", "ProbeError", "DEFAULT_PROBE_DATASETS"]
