"""The user errors an activation cache can raise (all :class:`~activation_cache.UserError`).

Each message names the file (path or URI) and what is wrong with it, so the CLI's one-line
``error:`` output is enough to act on.
"""

from __future__ import annotations

from .errors import UserError


class CacheError(UserError):
    """Base class of every cache problem a user can cause or fix."""


class CacheExistsError(CacheError):
    """The output location holds a cache built from a different config (use ``overwrite``)."""


class CorruptCacheError(CacheError):
    """A cache file is missing, truncated, or does not match its checksum or the manifest."""


class CacheMismatchError(CacheError):
    """The cache does not hold what was asked for (a hook, a split, a d_in, stored logits...)."""


class CacheInputError(CacheError):
    """The model or corpus cannot produce a valid cache (empty corpus, window > context...)."""
