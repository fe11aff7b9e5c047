"""The one exception family for user mistakes.

Anything a user can cause (a bad config, a missing or corrupted file, a mismatched cache) raises a
subclass of :class:`UserError` with a message that names the file or field and what is wrong. The
CLI prints such errors as one line and exits with status 2, never with a traceback. Bugs raise
ordinary exceptions and do show a traceback.
"""


class UserError(Exception):
    """Base class of every error caused by user input; the CLI prints it without a traceback."""
