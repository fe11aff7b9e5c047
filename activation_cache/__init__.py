"""activation_cache: text -> tokens -> hooked transformer_lens model -> sharded activation files.

Public API (everything else in this package is internal):

    UserError, ConfigError, StrictConfig   -- the project's error family and config base
"""

from .errors import UserError
from .strict_config import ConfigError, StrictConfig

__all__ = ["UserError", "ConfigError", "StrictConfig"]
