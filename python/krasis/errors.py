"""Exceptions that name the problem and the fix."""


class KrasisError(Exception):
    """Base class for errors Krasis reports to users."""


class ModelLoadError(KrasisError):
    """The model directory, its config or its weight files cannot be used as they are."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint's architecture has no adapter."""


class InvalidInputError(KrasisError, ValueError):
    """A request (token ids, prompt, sampling settings) cannot be served as given."""
