"""The library's own errors: problems a user can fix, each with a one-line message that names the
file, field or option at fault.

Everything here derives from :class:`QFormerError`, so a recipe can end a run on any of them
with a single ``error: ...`` line (no traceback), while a bug (any other exception) still
shows its traceback. Each class also derives from the builtin a caller would naturally catch
(``ValueError`` for a bad value, ``OSError`` for an unreadable file, ...).
"""

from __future__ import annotations


class QFormerError(Exception):
    """Base class of every error qformer raises on purpose (bad config, data, checkpoint, ...)."""


class ConfigError(QFormerError, ValueError):
    """A config field or option has a value that cannot work; the message names it."""


class CheckpointError(QFormerError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs arbitrary unpickling (code execution) and was refused."""


class WeightsMismatchError(QFormerError, ValueError):
    """A state dict does not fit a module (or a key layout); the message names the keys."""


class ImageLoadError(QFormerError, OSError):
    """An image file exists but cannot be decoded or converted; the message names the path."""


class DataError(QFormerError, ValueError):
    """A dataset, or a record in it, cannot be used as asked; the message names the file or field."""


class OutputDirError(QFormerError, OSError):
    """The output folder cannot be created or written to; the message names it."""


class NonFiniteLossError(QFormerError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient norm; the message names the step,
    the learning rate and the loss term."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ImageLoadError",
    "NonFiniteLossError",
    "OutputDirError",
    "QFormerError",
    "UnsafeCheckpointError",
    "WeightsMismatchError",
]
