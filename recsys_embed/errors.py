"""Project exceptions and warnings. Every message names the culprit and the fix."""

from __future__ import annotations


class RecsysEmbedError(Exception):
    """Base class: a problem the user can fix; the CLI prints it as one line without a traceback."""


class ConfigError(RecsysEmbedError):
    """The configuration is invalid (names the key path and the reason)."""


class IngestError(RecsysEmbedError):
    """The input log cannot be read as an interaction log (names the file, the column and the fix)."""


class OutputError(RecsysEmbedError, OSError):
    """An output cannot be written: a path that leaves the output root, a full disk, a denied permission, a
    read-only file system (names the path and the fix; the previous output stays as it was). Also an
    ``OSError`` (with the ``errno`` when the OS gave one), so ``except OSError`` callers keep working."""


class AccountingError(RecsysEmbedError):
    """Rows were lost: the row accounting does not balance."""


class DataWarning(UserWarning):
    """Input we could repair (and did); the message says what was changed."""
