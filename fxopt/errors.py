"""fxopt's error types. Every error a user can see derives from :class:`FxoptError`."""

from __future__ import annotations

__all__ = [
    "FxoptError",
    "TraceError",
    "PassError",
    "NumericsError",
    "VerificationError",
    "CalibrationError",
    "UnsupportedError",
    "PassContractError",
]


class FxoptError(Exception):
    """Base class of all fxopt errors."""


class TraceError(FxoptError):
    """A model (or one of its submodules) could not be traced.

    ``module`` is the qualified name of the module whose code failed ("" for the root) and
    ``location`` the source line, when known.
    """

    def __init__(self, message: str, *, module: str = "", location: str | None = None):
        super().__init__(message)
        self.module = module
        self.location = location


class PassError(FxoptError):
    """A pass failed. Names the pass and the passes that ran before it; the cause is chained."""

    def __init__(self, message: str, *, pass_name: str = "", previous: tuple[str, ...] = ()):
        super().__init__(message)
        self.pass_name = pass_name
        self.previous = tuple(previous)


class NumericsError(PassError):
    """``compile(check=...)`` found a pass whose output differs from the original model's."""


class VerificationError(PassError):
    """A graph broke one of fxopt's invariants after a pass."""


class CalibrationError(FxoptError):
    """Calibration could not run: no data, NaN/inf values, or inputs that do not fit the model."""


class UnsupportedError(FxoptError):
    """A backend cannot run what was asked of it; the message says why."""


class PassContractError(FxoptError, TypeError):
    """A pass broke the pass contract (e.g. returned ``None`` instead of a ``PassResult``).

    It is a ``TypeError`` too: the fix is in the pass's code, and the message says what to return.
    """
