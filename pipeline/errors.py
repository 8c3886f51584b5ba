"""Errors raised by the pipeline.

One root class, :class:`PipelineError`, and specific classes that also inherit
the matching built-in so callers can catch either (``except ValueError`` keeps
working). Every message should say what to do: which file, which field, what
was expected.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A configuration file is malformed or holds an invalid value."""


class InputError(PipelineError, OSError):
    """An input file is missing, unreadable, corrupt or lacks georeferencing."""


class GridError(PipelineError, ValueError):
    """Two layers do not overlap, or a grid cannot be built as asked."""


class ChannelError(PipelineError, ValueError):
    """The inputs cannot supply a channel that a model needs."""


class ModelError(PipelineError, ValueError):
    """A model artefact is malformed, incompatible or cannot be built."""


class OutputError(PipelineError, OSError):
    """An output cannot be written (permissions, disk, existing files)."""
