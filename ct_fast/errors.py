"""Errors raised for bad input. Every message names the problem and the fix."""


class CTFastError(ValueError):
    """Base class of ct_fast's user-facing errors (bad input, unsupported model)."""


class UnsupportedArchitectureError(CTFastError):
    """The model's architecture has no graph adapter."""


class NonFiniteError(CTFastError, FloatingPointError):
    """A loss, metric or score is NaN/inf; the step was refused and the model left untouched."""
