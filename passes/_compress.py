"""Layer selection shared by the compression passes (prune-magnitude, cluster-weights, low-rank).

These passes are *module-level*: they walk ``gm.named_modules()`` rather than the graph, so they also
reach layers inside float islands (untraced leaves) and work on any module tree.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from fxopt.graph_utils import set_attr_path

__all__ = ["DEFAULT_TYPES", "select_layers", "describe_selection"]

DEFAULT_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _matches(name: str, module: nn.Module, keys: Iterable[Any]) -> bool:
    for key in keys:
        if isinstance(key, type) and isinstance(module, key):
            return True
        if isinstance(key, str) and (name == key or name.startswith(key + ".")):
            return True
    return False


def _check_keys(keys: Iterable[Any], what: str) -> None:
    for key in keys:
        if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
            raise TypeError(f"{what} entries must be module names (str) or nn.Module types, got {key!r}")


def select_layers(root: nn.Module, include: tuple = (), exclude: tuple = (),
                  types: tuple[type, ...] = DEFAULT_TYPES) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """``(name, module)`` of every layer with a floating-point ``weight`` to compress, and notes on skips.

    A layer is taken when it is one of ``types`` or named/typed in ``include``, and not in ``exclude``.
    """
    _check_keys(include, "include")
    _check_keys(exclude, "exclude")
    found: list[tuple[str, nn.Module]] = []
    notes: list[str] = []
    for name, module in root.named_modules():
        if not (isinstance(module, types) or _matches(name, module, include)):
            continue
        if _matches(name, module, exclude):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.numel() == 0:
            if _matches(name, module, include):
                notes.append(f"{name}: skipped, it has no floating-point weight")
            continue
        found.append((name, module))
    return found, notes


def own_copy(root: nn.Module, module: nn.Module) -> nn.Module:
    """Replace ``module`` everywhere in ``root`` by a deep copy and return it.

    A graph traced with ``torch.fx.symbolic_trace`` shares its submodules with the user's model; the
    compression passes change modules in place (parametrizations), so they work on a copy (shared
    modules stay shared: every name that pointed to ``module`` gets the same copy).
    """
    names = [n for n, m in root.named_modules(remove_duplicate=False) if m is module and n]
    new = copy.deepcopy(module)
    for name in names:
        set_attr_path(root, name, new)
    return new


def describe_selection(include: tuple, types: tuple[type, ...] = DEFAULT_TYPES) -> str:
    kinds = ", ".join(t.__name__ for t in types)
    extra = f" or named in include={include!r}" if include else ""
    return f"no {kinds} layer with a floating-point weight{extra}"


def parametrizations_of(module: nn.Module, tensor: str = "weight") -> list[nn.Module]:
    if not parametrize.is_parametrized(module, tensor):
        return []
    return list(module.parametrizations[tensor])


def check_fraction(value: Any, what: str, meaning: str, *, zero_ok: bool = True, one_ok: bool = False) -> None:
    """``ValueError`` unless ``value`` is a finite number in [0, 1) (or (0, 1], per the flags)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and (
        (0.0 <= value if zero_ok else 0.0 < value) and (value <= 1.0 if one_ok else value < 1.0))
    if not ok:
        interval = f"{'[' if zero_ok else '('}0, 1{']' if one_ok else ')'}"
        raise ValueError(f"{what} must be a number in {interval} ({meaning}), got {value!r}")


def freeze_selection(p: Any) -> None:
    """Store a frozen pass's ``include`` / ``exclude`` options as tuples (hashable, printable)."""
    object.__setattr__(p, "include", as_tuple(p.include))
    object.__setattr__(p, "exclude", as_tuple(p.exclude))


def as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        return (value,)
    return tuple(value)
