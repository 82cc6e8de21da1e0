"""Graph helpers shared by the core, the passes and the backends (one home for each; not public API).

Attribute access by dotted path, unique names, argument binding, observer detection, single-user and
mutation checks, node bypassing.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.nn.functional as F

__all__ = [
    "bind_args",
    "get_attr_path",
    "has_attr_path",
    "is_observer",
    "set_attr_path",
    "single_user",
    "unique_name",
    "module_of",
    "referenced_targets",
    "is_referenced",
    "delete_attr_path",
    "delete_if_unreferenced",
    "call_sites",
    "unique_attr_name",
    "is_mutating",
    "has_mutating_user",
]


_RAISE = object()


def get_attr_path(root: Any, target: str, default: Any = _RAISE) -> Any:
    """``root.a.b.c`` for ``target == "a.b.c"``; ``default`` (when given) instead of an ``AttributeError``."""
    obj: Any = root
    for part in target.split("."):
        if default is _RAISE:
            obj = getattr(obj, part)
        else:
            obj = getattr(obj, part, default)
            if obj is default:
                return default
    return obj


def has_attr_path(root: torch.nn.Module, target: str) -> bool:
    """Whether ``root.a.b.c`` exists for ``target == "a.b.c"``."""
    try:
        get_attr_path(root, target)
    except AttributeError:
        return False
    return True


def set_attr_path(root: torch.nn.Module, target: str, value: Any) -> None:
    """Set ``root.a.b.c = value`` (modules are registered as submodules, parameters as parameters)."""
    parent_path, _, name = target.rpartition(".")
    parent = get_attr_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def delete_attr_path(root: torch.nn.Module, target: str) -> None:
    parent_path, _, name = target.rpartition(".")
    parent = get_attr_path(root, parent_path) if parent_path else root
    delattr(parent, name)


def module_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.nn.Module | None:
    """The submodule a ``call_module`` node calls, or ``None`` for any other node."""
    if node.op != "call_module" or not isinstance(node.target, str):
        return None
    return gm.get_submodule(node.target)


def referenced_targets(gm: torch.fx.GraphModule) -> set[str]:
    """Qualified names the graph reads: ``call_module`` and ``get_attr`` targets."""
    return {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr") and isinstance(n.target, str)}


def is_referenced(path: str, targets: Iterable[str]) -> bool:
    """Whether ``path`` is used: named by a target, inside a used module, or the parent of a used one."""
    for t in targets:
        if t == path or t.startswith(path + ".") or path.startswith(t + "."):
            return True
    return False


def delete_if_unreferenced(gm: torch.fx.GraphModule, path: str) -> bool:
    """Delete the attribute ``path`` of ``gm`` when the graph no longer refers to it. True if deleted."""
    if not has_attr_path(gm, path):
        return False
    if is_referenced(path, referenced_targets(gm)):
        return False
    delete_attr_path(gm, path)
    return True


def bypass_node(gm: torch.fx.GraphModule, node: torch.fx.Node, source: torch.fx.Node) -> list[str]:
    """Route ``node``'s users to ``source``, erase ``node`` and the ``get_attr`` inputs left unused.

    Returns the module/attribute targets that may now be unreferenced (for ``delete_if_unreferenced``).
    """
    inputs = node.all_input_nodes
    node.replace_all_uses_with(source)
    gm.graph.erase_node(node)
    dropped = [node.target] if node.op == "call_module" else []
    for arg in inputs:
        if arg.op == "get_attr" and not arg.users:
            dropped.append(arg.target)
            gm.graph.erase_node(arg)
    return dropped


def call_sites(gm: torch.fx.GraphModule, module: torch.nn.Module) -> list[torch.fx.Node]:
    """Every ``call_module`` node that calls this very module object (aliases included)."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is module]


def unique_name(base: str, taken: Callable[[str], bool], *, start: int | None = None, sep: str = "_") -> str:
    """The first name not ``taken``: ``base`` itself (when ``start`` is None), then ``base{sep}{i}`` for
    ``i = start`` (default 1), ``start + 1``..."""
    if start is None:
        if not taken(base):
            return base
        start = 1
    i = start
    while taken(f"{base}{sep}{i}"):
        i += 1
    return f"{base}{sep}{i}"


def unique_attr_name(root: torch.nn.Module, base: str) -> str:
    """A name not yet used as an attribute of ``root``: ``base``, ``base_1``, ``base_2``..."""
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in base) or "attr"
    if base[0].isdigit():
        base = "_" + base
    return unique_name(base, lambda name: hasattr(root, name))


def single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The only user of ``node``, or ``None`` when it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def is_observer(module: Any) -> bool:
    """An activation observer: :class:`fxopt.quant.observers.Observer` or a module with its interface."""
    return isinstance(module, torch.nn.Module) and callable(getattr(module, "calculate_qparams", None)) \
        and hasattr(module, "calibrated")


# builtins without an inspectable signature: parameter names and defaults
_CONV_PARAMS = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1),
                ("groups", 1))
_SIGNATURES: dict[Any, tuple[tuple[str, Any], ...]] = {
    F.conv1d: _CONV_PARAMS, F.conv2d: _CONV_PARAMS, F.conv3d: _CONV_PARAMS,
    F.linear: (("input", None), ("weight", None), ("bias", None)),
    # builtins and boolean-dispatch wrappers: inspect reads no signature (or (*args, **kwargs)) from them
    torch.cat: (("tensors", None), ("dim", 0)),
    F.avg_pool2d: (("input", None), ("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
                   ("count_include_pad", True), ("divisor_override", None)),
    F.max_pool2d: (("input", None), ("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1),
                   ("ceil_mode", False), ("return_indices", False)),
}


def bind_args(fn: Callable, node: torch.fx.Node) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults filled in; ``TypeError`` when the call does not fit
    ``fn``'s signature (or ``fn`` has none that can be read)."""
    if fn in _SIGNATURES:
        params = _SIGNATURES[fn]
        if len(node.args) > len(params) or set(node.kwargs) - {name for name, _ in params}:
            raise TypeError(f"unexpected arguments to {getattr(fn, '__name__', fn)}")
        found = {name: default for name, default in params}
        found.update(zip((name for name, _ in params), node.args))
        found.update(node.kwargs)
        return found
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except ValueError as exc:  # no signature for this builtin
        raise TypeError(str(exc)) from exc
    bound.apply_defaults()
    return dict(bound.arguments)


_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem, operator.delitem,
}


def is_mutating(node: torch.fx.Node) -> bool:
    """Whether ``node`` may write into one of its inputs (in-place op, ``out=``, ``inplace=True``)."""
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op == "call_module":
        owner = node.graph.owning_module
        module = owner.get_submodule(node.target) if owner is not None else None
        return getattr(module, "inplace", False) is True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
        # F.relu(x, True) and friends: an ``inplace`` positional argument set to True.
        if name in ("relu", "relu6", "hardtanh", "leaky_relu", "elu", "selu", "celu", "dropout", "threshold",
                    "rrelu", "hardswish", "hardsigmoid", "silu", "mish", "alpha_dropout", "dropout2d",
                    "dropout3d", "dropout1d", "feature_alpha_dropout"):
            return any(a is True for a in node.args[1:])
    return False


_VIEW_METHODS = {"view", "reshape", "flatten", "transpose", "permute", "squeeze", "unsqueeze", "expand", "narrow",
                 "select", "contiguous", "view_as", "reshape_as", "expand_as", "unflatten", "t", "detach"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, torch.narrow, torch.select, torch.t, torch.detach}


def _is_view_of(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return user.target in _VIEW_METHODS
    if user.op == "call_function":
        return user.target in _VIEW_FUNCTIONS
    if user.op == "call_module":
        owner = user.graph.owning_module
        module = owner.get_submodule(user.target) if owner is not None else None
        return isinstance(module, (torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten))
    return False


def mutating_users(node: torch.fx.Node, depth: int = 0) -> list[torch.fx.Node]:
    """The later ops that write into ``node``'s value, directly or through a view of it
    (e.g. ``y.relu_()``, ``nn.ReLU(inplace=True)(y)``, ``y.view(-1).add_(1)``, ``y[:, :3].copy_(x)``)."""
    found = []
    for user in node.users:
        if is_mutating(user) and bool(user.args) and user.args[0] is node:
            found.append(user)
        elif depth < 16 and _is_view_of(user, node):
            found.extend(mutating_users(user, depth + 1))
    return found


def has_mutating_user(node: torch.fx.Node, depth: int = 0) -> bool:
    """Whether a later op writes into ``node``'s value, directly or through a view of it."""
    return bool(mutating_users(node, depth))
