"""Project exceptions and warnings. Every message names the culprit and the fix."""

from __future__ import annotations


class RecsysEmbedError(Exception):
    """Base class: a problem the user can fix; the CLI prints it as one line without a traceback."""


class ConfigError(RecsysEmbedError):
    """The configuration is invalid (names the key path and the reason)."""


class IngestError(RecsysEmbedError):
    """The input log cannot be read as an interaction log (names the file, the column and the fix)."""


class AccountingError(RecsysEmbedError):
    """Rows were lost: the row accounting does not balance."""


class DataWarning(UserWarning):
    """Input we could repair (and did); the message says what was changed."""
