"""Errors a user can cause and fix: bad arguments, config values, manifests, missing or corrupt files.

Every one derives from ``MedmetaError`` and carries a one-line message that names the file,
task, value or argument and says what to do. Scripts catch ``MedmetaError`` alone and print
that line; anything else (an internal bug, running out of memory) keeps its traceback.
The subclasses that replace a ``ValueError`` also derive from it, so code that caught
``ValueError`` keeps working.
"""
from __future__ import annotations


class MedmetaError(Exception):
    """Base class of the errors a user can fix; the message is one line."""


class ConfigError(MedmetaError, ValueError):
    """A config key or value is unknown, of the wrong type or out of range."""


class ManifestError(MedmetaError, ValueError):
    """A manifest is malformed; the message names the entry and field."""


class SourceError(MedmetaError):
    """An npz file is missing, corrupt or not what the manifest describes."""


class StoreError(MedmetaError):
    """A store file is missing, corrupt, unreadable or unwritable."""


class EpisodeError(MedmetaError, ValueError):
    """Episodes cannot be drawn as asked (too few samples, bad settings, a mismatching set)."""


class MethodError(MedmetaError, ValueError):
    """A method name, import path or combination is unknown or cannot apply to the target."""


class PluginError(MethodError):
    """A user's method (imported by path) raised or returned something unusable; the message names
    the method and its module, and the original exception is chained for ``--debug``."""


def one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line (a user's message may span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")


class DiskFullError(MedmetaError, OSError):
    """A write ran out of disk space; nothing half-written was left behind."""
