"""Recipes by name, as the command line and the demo use them: ``"fuse,static_int8"``, ``"prune:sparsity=0.5"``.

The names are whatever :mod:`fxopt.recipes` exports (``__all__``), so recipes added there show up here
without a change. A recipe's first parameter named ``calibration`` receives the calibration data; a
``backend`` keyword, where the recipe has one, receives the target backend.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any, Callable, Iterable

import torch

from .errors import FxoptError

__all__ = ["UsageError", "recipe_names", "parse", "build", "needs_calibration", "call_recipe", "compile_recipes",
           "required_options", "targets_backend", "lower_if_prepared"]


class UsageError(FxoptError, ValueError):
    """Bad command-line input (unknown name, malformed option); the CLI exits with code 2."""


def _recipes():
    from fxopt import recipes  # facade-level import

    return recipes


def recipe_names() -> list[str]:
    mod = _recipes()
    return sorted(n for n in getattr(mod, "__all__", []) if callable(getattr(mod, n, None)))


def _function(name: str) -> Callable[..., list]:
    names = recipe_names()
    if name not in names:
        raise UsageError(f"unknown recipe {name!r}; valid recipes: {', '.join(names)}")
    return getattr(_recipes(), name)


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``"fuse,prune:sparsity=0.5:structured=True"`` -> ``[("fuse", {}), ("prune", {"sparsity": 0.5, ...})]``."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, *options = item.split(":")
        kwargs: dict[str, Any] = {}
        for opt in options:
            key, sep, value = opt.partition("=")
            if not sep or not key:
                raise UsageError(f"recipe option {opt!r} in {item!r} is not key=value (e.g. prune:sparsity=0.5)")
            kwargs[key.strip()] = _value(value.strip())
        _function(name)  # unknown names fail here, listing the valid ones
        out.append((name, kwargs))
    if not out:
        raise UsageError(f"no recipe given; valid recipes: {', '.join(recipe_names())}")
    return out


def _params(fn: Callable) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def needs_calibration(name: str) -> bool:
    return "calibration" in _params(_function(name))


def required_options(name: str) -> list[str]:
    """Parameters of recipe ``name`` that the caller must give (calibration data and backend aside)."""
    return [p.name for p in _params(_function(name)).values()
            if p.name not in ("calibration", "backend") and p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def targets_backend(name: str) -> bool:
    """Whether recipe ``name`` prepares for a backend: it takes calibration data or a ``backend``, or one of
    its passes has a ``backend`` field (stub insertion, QAT preparation)."""
    fn = _function(name)
    params = _params(fn)
    if "calibration" in params or "backend" in params:
        return True
    if required_options(name):
        return False
    return any(hasattr(p, "backend") for p in fn())


def call_recipe(fn: Callable[..., list], *args: Any, backend: str | None = None, **kwargs: Any) -> list:
    """``fn(*args, **kwargs)``, adding ``backend=`` only where the recipe takes it."""
    if backend is not None and "backend" in _params(fn) and "backend" not in kwargs:
        kwargs["backend"] = backend
    return fn(*args, **kwargs)


def build(name: str, options: dict[str, Any] | None = None, *, calibration: Iterable[Any] | None = None,
          backend: str | None = None) -> list:
    """The pass list of recipe ``name`` with ``options``; ``UsageError`` saying what is missing otherwise."""
    fn = _function(name)
    options = dict(options or {})
    params = _params(fn)
    unknown = [k for k in options if k not in params]
    if unknown:
        accepted = [p for p in params if p not in ("calibration", "backend")]
        raise UsageError(f"recipe {name!r} has no option {unknown[0]!r}; its options: {', '.join(accepted) or 'none'}")
    args = []
    if "calibration" in params:
        if calibration is None:
            raise UsageError(f"recipe {name!r} needs calibration data: pass --calib random|folder:PATH|npz:PATH")
        args.append(calibration)
    for pname in required_options(name):
        if pname not in options:
            raise UsageError(f"recipe {name!r} needs {pname}: write {name}:{pname}=VALUE")
    try:
        return call_recipe(fn, *args, backend=backend, **options)
    except TypeError as exc:
        raise UsageError(f"recipe {name!r} rejected its options {options}: {exc}") from exc


def lower_if_prepared(gm: torch.nn.Module, backend: str | None) -> tuple[torch.nn.Module, str]:
    """Lower ``gm`` to ``backend``; a graph no recipe prepared stays a PyTorch module when the backend cannot
    lower it (dynamic int8 or fp16 with ``x86``). Returns the module and a note saying so ("" otherwise)."""
    import fxopt
    from fxopt import meta
    from fxopt.errors import UnsupportedError

    if backend is None:
        return gm, ""
    prepared = meta.backend_of(gm) is not None
    try:
        return fxopt.lower(gm, backend), ""
    except UnsupportedError as exc:
        if prepared:
            raise
        return gm, f"nothing for backend {backend!r} to lower ({str(exc).split(':')[0]}); the result runs in PyTorch"


def compile_recipes(model: torch.nn.Module, recipes: list[tuple[str, dict[str, Any]]], backend: str | None,
                    example: Any, calibration: Iterable[Any] | None = None) -> tuple[torch.nn.Module, str]:
    """``fxopt.compile`` with the named recipes' passes (in order), then :func:`lower_if_prepared`."""
    import fxopt

    passes: list = []
    for name, options in recipes:
        passes += build(name, options, calibration=calibration, backend=backend)
    example = example if isinstance(example, tuple) else (example,)
    if backend is not None and any(targets_backend(name) for name, _ in recipes):
        return fxopt.compile(model, passes, example_inputs=example, backend=backend), ""
    return lower_if_prepared(fxopt.compile(model, passes, example_inputs=example), backend)
