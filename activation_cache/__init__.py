"""activation_cache: text -> tokens -> hooked transformer_lens model -> sharded activation files.

Public API (everything else in this package is internal):

    UserError, ConfigError, StrictConfig   -- the project's error family and config base
    ModelSpec, load_model, model_identity, resolve_hook, ModelLoadError, HookNameError
                                           -- which model; load it as a frozen HookedTransformer
    CorpusSpec, Document, load_corpus, split_documents, CorpusError
                                           -- which text; deterministic train/val split by document
    WindowedTextDataset, train_mask_for, WindowError
                                           -- tokenize once into windows with attention/train masks
"""

from .errors import UserError
from .strict_config import ConfigError, StrictConfig
from .corpus import CorpusError, CorpusSpec, Document, load_corpus, split_documents
from .models import HookNameError, ModelLoadError, ModelSpec, load_model, model_identity, resolve_hook
from .windowed import WindowedTextDataset, WindowError, train_mask_for

__all__ = ["UserError", "ConfigError", "StrictConfig"]
__all__ += ["ModelSpec", "load_model", "model_identity", "resolve_hook", "ModelLoadError",
            "HookNameError"]
__all__ += ["CorpusSpec", "Document", "load_corpus", "split_documents", "CorpusError"]
__all__ += ["WindowedTextDataset", "train_mask_for", "WindowError"]
