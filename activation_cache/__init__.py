"""activation_cache: text -> tokens -> hooked transformer_lens model -> sharded activation files.

Public API (everything else in this package is internal):

    UserError, ConfigError, StrictConfig   -- the project's error family and config base
    ModelSpec, load_model, model_identity, resolve_hook, ModelLoadError, HookNameError
                                           -- which model; load it as a frozen HookedTransformer
    CorpusSpec, Document, load_corpus, split_documents, CorpusError
                                           -- which text; deterministic train/val split by document
    WindowedTextDataset, train_mask_for, WindowError
                                           -- tokenize once into windows with attention/train masks
    CacheConfig, build_cache               -- build (or resume) a sharded, verified activation cache
    open_cache, CacheReader, SequenceBatch, CacheTokenSource, TokenBatch
                                           -- read it: shuffled token batches (input, target),
                                              whole windows
    compact_logprobs, compact_kl           -- compact clean next-token distributions and their KL
    CacheError, CacheExistsError, CorruptCacheError, CacheMismatchError, CacheInputError
"""

from .errors import UserError
from .strict_config import ConfigError, StrictConfig
from .corpus import CorpusError, CorpusSpec, Document, load_corpus, split_documents
from .models import HookNameError, ModelLoadError, ModelSpec, load_model, model_identity, resolve_hook
from .windowed import WindowedTextDataset, WindowError, train_mask_for
from .cache_config import CacheConfig
from .cache_errors import (CacheError, CacheExistsError, CacheInputError, CacheMismatchError,
                           CorruptCacheError)
from .builder import build_cache
from .reader import CacheReader, CacheTokenSource, SequenceBatch, open_cache
from .token_batch import TokenBatch
from .compact_logits import compact_kl, compact_logprobs

__all__ = ["UserError", "ConfigError", "StrictConfig"]
__all__ += ["ModelSpec", "load_model", "model_identity", "resolve_hook", "ModelLoadError",
            "HookNameError"]
__all__ += ["CorpusSpec", "Document", "load_corpus", "split_documents", "CorpusError"]
__all__ += ["WindowedTextDataset", "train_mask_for", "WindowError"]
__all__ += ["CacheConfig", "build_cache", "open_cache", "CacheReader", "SequenceBatch",
            "CacheTokenSource", "TokenBatch", "compact_logprobs", "compact_kl", "CacheError",
            "CacheExistsError", "CorruptCacheError", "CacheMismatchError", "CacheInputError"]
