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
    """Training data cannot be used: a missing source or folder, a bad manifest line, changed settings, few images."""


class ImageRejected(PhotoMakerError, ValueError):
    """One training image fails a data-preparation stage; ``prepare-data`` reports it and goes on."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


class EvaluationError(PhotoMakerError, RuntimeError):
    """A process of a multi-process ``eval`` run failed; every process stops with that process's message."""


class ControlImageError(PhotoMakerError, ValueError):
    """A control image (pose, edges, depth, sketch) cannot be used: missing, empty, unreadable, no person."""


class MaskError(ControlImageError):
    """An inpainting mask would change nothing (empty) or everything (all white), or its face box is invalid."""


class ControlModelUnavailableError(ModelLoadError):
    """A control model (ControlNet, T2I-Adapter, IP-Adapter, pose or depth estimator) cannot be loaded."""


class TrainingConfigError(PhotoMakerError, ValueError):
    """A training option is out of range or contradicts another one (steps, batch size, init, resume)."""
