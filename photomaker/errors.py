"""Typed exceptions: every user-facing failure is one of these, with a message that says what to change.

They subclass ``ValueError``/``RuntimeError`` as well, so callers that catch the builtin kinds keep working.
The app turns any ``PhotoMakerError`` into a ``gr.Error`` with the same message.
"""


class PhotoMakerError(Exception):
    """Base class of all errors this library raises on purpose."""


class PromptError(PhotoMakerError, ValueError):
    """The prompt cannot be used: missing or repeated trigger word, no class word, too long."""


class CheckpointError(PhotoMakerError, ValueError):
    """A PhotoMaker checkpoint is missing, unsafe, or does not have the official layout."""


class IDImageError(PhotoMakerError, ValueError):
    """An ID photo cannot be used: not an image, unreadable, too large, wrong count."""


class NoFaceError(IDImageError):
    """No face was found in a photo that needs one."""


class FaceModelUnavailableError(PhotoMakerError, RuntimeError):
    """A face-analysis backend's model files are not installed or cannot be fetched."""


class InvalidRequestError(PhotoMakerError, ValueError):
    """A generation parameter is out of range or unknown (steps, guidance, seed, size, style, ...)."""


class ModelLoadError(PhotoMakerError, RuntimeError):
    """The base model or the adapter could not be loaded; the message says why and how to fix it."""


class TrainingDataError(PhotoMakerError, ValueError):
    """A training data folder or its manifest.jsonl cannot be used: missing files, bad lines, too few images."""


class TrainingConfigError(PhotoMakerError, ValueError):
    """A training option is out of range or contradicts another one (steps, batch size, init, resume)."""
