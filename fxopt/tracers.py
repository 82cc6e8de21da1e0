"""The torch.fx tracers behind :func:`fxopt.trace`.

:class:`LeafTracer` is torch.fx's symbolic tracer with extra leaf modules; when tracing raises it
knows the deepest module whose own code raised, which ``mode="auto"`` then makes a leaf.

:class:`ValueTracer` is the fallback for models whose root ``forward`` cannot run on proxies
(detection models iterate over their list of images, call ``len()`` and branch on values). Every
node it records is also computed on the example inputs, and its proxies carry that value: ``bool()``,
``len()``, iteration, ``int()``/``float()`` resolve to it, and each such decision is written down as
a note with the user's source line (the graph is *specialized* on the examples). Submodules called
as leaves run on real values.

A module *method* that the root calls directly and that cannot run on proxies
(``SSD.postprocess_detections``) becomes a *method island*: a ``fxopt_island_*`` submodule of the
root (:class:`MethodIsland`) that runs the method on real values. The island keeps a reference to
the method's owner outside ``_modules``, so tensors that only the owner holds don't follow
``gm.to(...)``.
"""

from __future__ import annotations

import inspect
import logging
import operator
import os
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx

from . import meta

__all__ = ["LeafTracer", "MethodIsland", "ValueTracer", "user_location"]

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FXOPT_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _last_user_frame(frames: Iterable[traceback.FrameSummary]) -> str | None:
    """``file:line`` of the innermost frame in model code (not generated, not torch's, not fxopt's)."""
    location = None
    for frame in frames:
        path = os.path.abspath(frame.filename)
        if not (frame.filename.startswith("<") or path.startswith((_TORCH_DIR, _FXOPT_DIR))):
            location = f"{frame.filename}:{frame.lineno}"
    return location


def user_location(exc: BaseException) -> str | None:
    """``file:line`` in model code where ``exc`` was raised, if any."""
    return _last_user_frame(traceback.extract_tb(exc.__traceback__))


# ----------------------------------------------------------------------------------------------
# symbolic


class LeafTracer(torch.fx.Tracer):
    """torch.fx tracer with extra leaves that remembers the deepest module whose code raised."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.failure: tuple[BaseException, str] | None = None

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        qualname = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if self.failure is None or self.failure[0] is not exc:  # the innermost handler sees it first
                self.failure = (exc, qualname)
            raise

    def culprit(self, exc: BaseException) -> str:
        """Qualified name of the deepest module whose code raised ``exc``; ``""`` for the root."""
        return self.failure[1] if self.failure is not None and self.failure[0] is exc else ""


# ----------------------------------------------------------------------------------------------
# proxies carrying values


class _ValueProxy(torch.fx.Proxy):
    """A proxy that also carries its value on the example inputs; Python asks get that value."""

    def __getattr__(self, k: str) -> Any:
        return _ValueAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.specialize(self, len)

    def __index__(self) -> int:
        return self.tracer.specialize(self, operator.index)

    def __int__(self) -> int:
        return self.tracer.specialize(self, int)

    def __float__(self) -> float:
        return self.tracer.specialize(self, float)


class _ValueAttribute(torch.fx.proxy.Attribute, _ValueProxy):
    pass


def _rebuildable(value: Any) -> bool:
    """A plain Python object holding proxies (torchvision's ``ImageList``) that its class can rebuild."""
    if isinstance(value, (torch.nn.Module, torch.Tensor, torch.fx.Proxy, type)) or not hasattr(value, "__dict__"):
        return False
    if not any(isinstance(v, torch.fx.Proxy) for v in torch.utils._pytree.tree_leaves(vars(value))):
        return False
    try:
        params = inspect.signature(type(value)).parameters
    except (TypeError, ValueError):
        return False
    return set(params) == set(vars(value))


def _map_proxies(value: Any, fn: Callable[[torch.fx.Proxy], Any]) -> Any:
    """``value`` with every proxy inside it (containers, slices, rebuildable objects) replaced by ``fn(proxy)``."""
    if isinstance(value, torch.fx.Proxy):
        return fn(value)
    if _rebuildable(value):
        return type(value)(**{k: _map_proxies(v, fn) for k, v in vars(value).items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map_proxies(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_proxies(v, fn) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _map_proxies(v, fn)) for k, v in value.items())
    if isinstance(value, slice):
        return slice(_map_proxies(value.start, fn), _map_proxies(value.stop, fn), _map_proxies(value.step, fn))
    return value


# ----------------------------------------------------------------------------------------------
# method islands


class MethodIsland(torch.nn.Module):
    """A leaf that runs one method of a module (e.g. ``SSD.postprocess_detections``) on real values.

    The owner is held outside ``_modules`` so that its parameters are not registered twice.
    """

    def __init__(self, owner: torch.nn.Module, method: str):
        super().__init__()
        self.__dict__["owner"] = owner
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(type(self.owner), self.method)(self.owner, *args, **kwargs)


_MODULE_INTERNALS = frozenset(dir(torch.nn.Module))


def _island_name(owner_qualname: str, method: str) -> str:
    return "fxopt_island_" + (owner_qualname.replace(".", "_") + "_" if owner_qualname else "") + method


def _failing_method(exc: BaseException, root: torch.nn.Module) -> tuple[str, str] | None:
    """(owner qualname, method) of the outermost non-forward module method in the failing call chain."""
    by_id = {id(m): name for name, m in root.named_modules()}
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        method = tb.tb_frame.f_code.co_name
        if (
            isinstance(owner, torch.nn.Module)
            and id(owner) in by_id
            and inspect.isfunction(inspect.getattr_static(type(owner), method, None))
            and method != "forward"
            and not method.startswith("__")
            and method not in _MODULE_INTERNALS
        ):
            return by_id[id(owner)], method
        tb = tb.tb_next
    return None


# ----------------------------------------------------------------------------------------------
# the value-carrying tracer


class ValueTracer(LeafTracer):
    """Computes every node on the example inputs while tracing; specializes Python control flow.

    ``inputs``: example value of each ``forward`` parameter. ``notes`` collects the specializations.
    ``islands`` (island name → (owner qualname, method)) is shared by the tracers of successive
    attempts: :meth:`add_island` adds to it, :meth:`trace` installs them.
    """

    def __init__(self, leaves: set[str], inputs: dict[str, Any], notes: list[str], islands: dict[str, tuple[str, str]]):
        super().__init__(leaves | set(islands))
        self.inputs = inputs
        self.notes = notes
        self.islands = islands
        self.values: dict[torch.fx.Node, Any] = {}
        self.evaluating = False  # while True, modules run for real (torch.fx's patches step aside)

    def trace(self, root: Any, concrete_args: Any = None) -> torch.fx.Graph:
        patched = []
        for island, (owner_name, method) in self.islands.items():
            owner = root.get_submodule(owner_name)
            if not hasattr(root, island):
                root.add_module(island, MethodIsland(owner, method))
            owner.__dict__[method] = self._island_caller(island)
            patched.append((owner, method))
        try:
            return super().trace(root, concrete_args)
        finally:
            for owner, method in patched:
                del owner.__dict__[method]

    def _island_caller(self, island: str) -> Callable[..., torch.fx.Proxy]:
        def call(*args: Any, **kwargs: Any) -> torch.fx.Proxy:
            return self.create_proxy("call_module", island, args, kwargs)

        return call

    def add_island(self, exc: BaseException, location: str | None) -> meta.LeafInfo | None:
        """Make the module method that raised ``exc`` an island for the next attempt.

        Returns its leaf record, or None when no method is to blame or it already is an island.
        """
        found = _failing_method(exc, self.root)
        if found is None or _island_name(*found) in self.islands:
            return None
        island = _island_name(*found)
        self.islands[island] = found
        owner_name, method = found
        what = f"{type(self.root.get_submodule(owner_name)).__name__}.{method}"
        reason = f"method {what} runs on real values: {type(exc).__name__}: {exc} (at {location})"
        qualname = f"{owner_name}.{method}" if owner_name else method
        log.info("keeping %s as an island: %s", qualname, reason)
        return meta.LeafInfo(qualname, what, reason, attribute=island)

    # -- computing values ------------------------------------------------------------------------

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self.evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self.evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        if _rebuildable(a):  # rebuilt in the graph by calling its class with its attributes
            return self.create_proxy("call_function", type(a), (), dict(vars(a))).node
        return super().create_arg(a)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ValueProxy(node, self)

    def value_of(self, proxy: torch.fx.Proxy) -> Any:
        return self.values[proxy.node]

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        value = self._evaluate(kind, target, _map_proxies(args, self.value_of), _map_proxies(kwargs, self.value_of))
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = value
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The value of the node about to be created, computed on real values."""
        self.evaluating = True
        try:
            with torch.no_grad():
                if kind == "placeholder":
                    return self.inputs[target] if target in self.inputs else (args[0] if args else None)
                if kind == "get_attr":
                    return operator.attrgetter(target)(self.root)
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                return self.root.get_submodule(target)(*args, **kwargs)
        finally:
            self.evaluating = False

    # -- specializing Python on values ------------------------------------------------------------

    def specialize(self, proxy: torch.fx.Proxy, fn: Callable[[Any], Any]) -> Any:
        value = fn(self.value_of(proxy))
        self._note(f"{fn.__name__}({proxy.node.name}) specialized to {value!r}")
        return value

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        return self.specialize(obj, bool)

    def iter(self, obj: torch.fx.Proxy) -> Iterator:
        value = self.value_of(obj)
        if isinstance(value, dict):
            self._note(f"iteration over {obj.node.name} specialized to keys {list(value)!r}")
            return iter(list(value))
        self._note(f"iteration over {obj.node.name} specialized to length {len(value)}")
        return iter([obj[i] for i in range(len(value))])

    def keys(self, obj: torch.fx.Proxy) -> Any:
        value = self.value_of(obj)
        self._note(f"keys of {obj.node.name} specialized to {list(value)!r}")
        return list(value.keys())

    def _note(self, what: str) -> None:
        self.notes.append(f"{what} at {_last_user_frame(traceback.extract_stack())}")
