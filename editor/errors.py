"""Specific, actionable exceptions raised by the editor."""


class EditorError(Exception):
    """Base class for every error the editor raises on purpose."""


class UnsupportedArchitecture(EditorError):
    """The model's ``config.model_type`` is not in the architecture registry."""


class ModelLoadError(EditorError):
    """The model could not be found or read."""


class StatsError(EditorError):
    """Key statistics could not be computed or read, or do not match the model."""


class EditRequestError(EditorError):
    """An edit request is malformed (for example the prompt does not contain the subject)."""


class DeltaMismatch(EditorError):
    """A step delta does not fit the model it is applied to."""
