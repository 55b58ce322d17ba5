"""The one base class of the mistakes a user can make and fix.

A :class:`UserError` is raised for bad input (a path that does not exist, a malformed data
line, a config value out of range, a run directory that already holds a run), never for a
bug. Every module's own error class derives from it (``ConfigError``, ``DataError``,
``ModelLoadError``, ...), so the ``fedspine`` command prints any of them as one line,
``fedspine <command>: <message>``, and exits with status 2, instead of a traceback. The
message names the problem and, where there is one, the fix.

This module imports nothing, so every package may import it (``models`` included, which
otherwise imports nothing of the rest of the core).
"""


class UserError(Exception):
    """A mistake in what the user asked for; the message names it and, if it can, the fix."""


class RunDirError(UserError, ValueError):
    """A run directory that cannot be used as asked (it holds a run, or nothing to resume)."""


class StorageError(UserError):
    """A run's files cannot be written (disk full, read-only or missing directory); what was
    saved before is intact, so the run continues with ``--resume`` once that is fixed."""
