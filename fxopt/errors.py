"""fxopt's error types. Every error a user can see derives from :class:`FxoptError`."""

from __future__ import annotations

import functools

__all__ = [
    "FxoptError",
    "TraceError",
    "PassError",
    "NumericsError",
    "VerificationError",
    "PreconditionError",
    "PostconditionError",
    "CalibrationError",
    "UnsupportedError",
    "PassContractError",
    "in_pass",
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


class PreconditionError(PassError):
    """A pass's ``requires`` refused the graph it was given (the cause is chained)."""


class PostconditionError(PassError):
    """A pass's ``ensures`` found the graph not in the promised state (the cause is chained)."""


class CalibrationError(FxoptError):
    """Calibration could not run: no data, NaN/inf values, or inputs that do not fit the model."""


class UnsupportedError(FxoptError):
    """A backend cannot run what was asked of it; the message says why."""


class PassContractError(FxoptError, TypeError):
    """A pass broke the pass contract (e.g. returned ``None`` instead of a ``PassResult``).

    It is a ``TypeError`` too: the fix is in the pass's code, and the message says what to return.
    """


@functools.lru_cache(maxsize=None)
def _pass_error_type(kind: type[PassError], cause: type[FxoptError]) -> type[PassError]:
    """``kind`` that is also a ``cause`` (e.g. a PassError that is still a CalibrationError)."""
    if issubclass(cause, kind):
        return cause
    return type(cause.__name__, (kind, cause), {"__module__": cause.__module__, "__qualname__": cause.__qualname__})


def in_pass(exc: BaseException, message: str, *, pass_name: str, previous: tuple[str, ...] = (),
            kind: type[PassError] = PassError) -> PassError:
    """``exc`` as a :class:`PassError` (``kind``) naming the pass and the passes before it.

    An fxopt error keeps its own class too (a :class:`CalibrationError` raised in a pass is caught by
    ``except CalibrationError`` and by ``except PassError``) and its attributes; chain the cause with
    ``raise in_pass(...) from exc``.
    """
    cls = _pass_error_type(kind, type(exc)) if isinstance(exc, FxoptError) else kind
    err = cls.__new__(cls)
    if isinstance(exc, FxoptError):
        err.__dict__.update(exc.__dict__)
    Exception.__init__(err, message)
    err.pass_name, err.previous = pass_name, tuple(previous)
    return err
