"""Tracing a model to a ``torch.fx.GraphModule``: symbolic, auto (leaves where needed) and export.

``mode="auto"`` traces symbolically; when that fails it finds the deepest module whose own code
raised (the tracer keeps the module call stack), makes that module a leaf and tries again. When the
failing code is the root's own ``forward`` (detection models iterate over their list of images, call
``len()`` and branch on values), and ``example_inputs`` are given, it traces again with
proxies that also carry the value computed on the example inputs:
``bool()``, ``len()``, iteration and ``int()`` then resolve to those values. Such a graph is
*specialized* on the example inputs (number of images, image size, and any branch taken on data);
every specialization is listed by :func:`fxopt.meta.trace_notes`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import traceback
from typing import Any, Iterator, Sequence

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from . import meta
from .errors import TraceError

__all__ = ["trace", "untraced", "MODES"]

log = logging.getLogger(__name__)

MODES = ("auto", "symbolic", "export")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)


def trace(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Sequence[Any] = (),
    mode: str = "auto",
) -> torch.fx.GraphModule:
    """Trace ``model`` to a GraphModule that is a drop-in replacement for it.

    ``example_inputs``: one tensor, or a tuple/list of positional arguments (a detection model
    takes ``([image],)``). ``leaf_modules``: module types, qualified names or instances kept as
    opaque calls. ``model`` is not modified: tracing works on a deep copy.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxopt.trace expects a torch.nn.Module, got {type(model).__name__}; wrap functions in an nn.Module")
    if mode not in MODES:
        raise ValueError(f"unknown trace mode {mode!r}; choose one of {', '.join(MODES)}")
    args = _as_args(example_inputs)
    requested = _requested_leaves(model, leaf_modules)
    work = copy.deepcopy(model)
    with _untouched(work):
        if mode == "export":
            gm, leaves, notes = _export(work, args), [], []
        else:
            gm, leaves, notes = trace_with_leaves(work, args, requested, auto=(mode == "auto"))
        gm.training = model.training  # the root's flag only; submodules keep theirs
        meta.set_leaves(gm, leaves)
        meta.set_trace_notes(gm, notes)
        if args:
            propagate_shapes(gm, args)
    log.info("traced %s (%s): %d nodes, %d leaves", type(model).__name__, mode, len(gm.graph.nodes), len(leaves))
    return gm


def untraced(gm: torch.nn.Module) -> list[str]:
    """Qualified names of the submodules the tracer kept as leaves (see ``fxopt.meta.leaves`` for why)."""
    return [info.qualname for info in meta.leaves(gm)]


# ----------------------------------------------------------------------------------------------
# helpers shared with _value_tracer


def _as_args(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _requested_leaves(model: torch.nn.Module, leaf_modules: Sequence[Any]) -> dict[str, meta.LeafInfo]:
    """Resolve ``leaf_modules`` (types, qualified names, instances) to qualified names of ``model``."""
    if isinstance(leaf_modules, (str, type, torch.nn.Module)):
        leaf_modules = (leaf_modules,)
    named = dict(model.named_modules())
    by_id = {id(m): name for name, m in named.items()}
    names: list[str] = []
    for item in leaf_modules:
        if isinstance(item, str):
            if item not in named or item == "":
                raise TraceError(
                    f"leaf_modules names {item!r}, which is not a submodule of {type(model).__name__}; "
                    f"use a qualified name from model.named_modules(), e.g. {next(iter(list(named)[1:]), '')!r}",
                    module=item,
                )
            names.append(item)
        elif isinstance(item, type) and issubclass(item, torch.nn.Module):
            names += [n for n, m in named.items() if n and isinstance(m, item)]
        elif isinstance(item, torch.nn.Module):
            if id(item) not in by_id or by_id[id(item)] == "":
                raise TraceError(
                    f"leaf_modules holds a {type(item).__name__} instance that is not a submodule of the model; "
                    "pass a submodule of the model, its qualified name or its type",
                )
            names.append(by_id[id(item)])
        else:
            raise TypeError(f"leaf_modules items must be module types, qualified names or modules, got {item!r}")
    return {n: meta.LeafInfo(n, type(named[n]).__name__, "requested by the user", requested=True) for n in names}


def user_location(exc: BaseException) -> str | None:
    """``file:line`` of the innermost traceback frame outside torch and fxopt, if any."""
    location = None
    for frame in traceback.extract_tb(exc.__traceback__):
        name = os.path.abspath(frame.filename)
        if frame.filename.startswith("<") or name.startswith(_TORCH_DIR) or os.path.dirname(name) == os.path.dirname(_THIS_FILE):
            continue
        location = f"{frame.filename}:{frame.lineno}"
    return location


@contextlib.contextmanager
def _untouched(module: torch.nn.Module) -> Iterator[None]:
    """Restore buffers (BatchNorm statistics) and the RNG state after running ``module`` on examples."""
    saved = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, buf in module.named_buffers():
                    if name in saved and buf.shape == saved[name].shape:
                        buf.copy_(saved[name])


def clone_inputs(args: tuple) -> tuple:
    """Copies of the example inputs, so that models writing into their inputs don't alter them."""
    return torch.utils._pytree.tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args)


class _RecordingShapeProp(ShapeProp):
    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def run_recording(gm: torch.fx.GraphModule, args: tuple) -> tuple[Any, torch.fx.Node | None, Exception | None]:
    """Run ``gm`` on ``args`` filling ``node.meta['tensor_meta']``; returns (output, failing node, error)."""
    prop = _RecordingShapeProp(gm)
    prop.current = None
    try:
        with torch.no_grad():
            return prop.propagate(*clone_inputs(args)), None, None
    except Exception as exc:  # metadata is best effort: the nodes before the failure keep theirs
        return None, prop.current, exc


def propagate_shapes(gm: torch.fx.GraphModule, args: tuple) -> None:
    """Shape/dtype metadata on every node that runs on ``args`` (best effort, never raises)."""
    with _untouched(gm):
        _, node, exc = run_recording(gm, args)
    if exc is not None:
        log.warning("shape propagation stopped at node %s: %s", getattr(node, "name", "?"), exc)


def _export(work: torch.nn.Module, args: tuple) -> torch.fx.GraphModule:
    if not args:
        raise TraceError('mode="export" needs example_inputs: call fxopt.trace(model, (x,), mode="export")')
    try:
        ep = torch.export.export(work, clone_inputs(args))
        gm = ep.module()
    except Exception as exc:
        raise TraceError(
            f"torch.export could not trace {type(work).__name__}: {type(exc).__name__}: {exc}. "
            'Try mode="auto", which keeps untraceable submodules as leaves',
            module="",
            location=user_location(exc),
        ) from exc
    if not isinstance(gm, torch.fx.GraphModule):  # pragma: no cover - torch always returns one today
        raise TraceError(f"torch.export returned a {type(gm).__name__}, not a GraphModule")
    return gm


def signature_concrete_args(module: torch.nn.Module, args: tuple) -> dict[str, Any]:
    """Arguments of ``forward`` that the example inputs don't pass and that have defaults: constants."""
    params = list(inspect.signature(module.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    concrete = {p.name: p.default for p in positional[len(args):] if p.default is not p.empty}
    concrete.update({p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty})
    return concrete


# ----------------------------------------------------------------------------------------------
# tracers


class _Failure(Exception):
    """Tracing failed in a way that making a submodule a leaf cannot fix."""

    def __init__(self, exc: Exception, module: str, location: str | None):
        super().__init__(str(exc))
        self.exc, self.module, self.location = exc, module, location


class _Tracer(torch.fx.Tracer):
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
        return self.failure[1] if self.failure is not None and self.failure[0] is exc else ""


class _ValueProxy(torch.fx.Proxy):
    """A proxy that also carries its value on the example inputs; Python asks get that value."""

    def __getattr__(self, k: str) -> Any:
        return _ValueAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.specialize(self, len)

    def __index__(self) -> int:
        return self.tracer.specialize(self, int)

    def __int__(self) -> int:
        return self.tracer.specialize(self, int)

    def __float__(self) -> float:
        return self.tracer.specialize(self, float)


class _ValueAttribute(torch.fx.proxy.Attribute, _ValueProxy):
    pass


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.fx.Proxy):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _map(v, fn)) for k, v in value.items())
    if isinstance(value, slice):
        return slice(_map(value.start, fn), _map(value.stop, fn), _map(value.step, fn))
    return value


class _ValueTracer(_Tracer):
    """Computes every node on the example inputs while tracing; specializes Python control flow."""

    def __init__(self, leaves: set[str], inputs: dict[str, Any], notes: list[str]):
        super().__init__(leaves)
        self.inputs = inputs
        self.notes = notes
        self.values: dict[torch.fx.Node, Any] = {}

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ValueProxy(node, self)

    def value_of(self, proxy: torch.fx.Proxy) -> Any:
        return self.values[proxy.node]

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # noqa: ANN001
        value = self._evaluate(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = value
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.inputs[target] if target in self.inputs else (args[0] if args else None)
        if kind == "get_attr":
            obj: Any = self.root
            for part in target.split("."):
                obj = getattr(obj, part)
            return obj
        cargs, ckwargs = _map(args, self.value_of), _map(kwargs, self.value_of)
        with torch.no_grad():
            if kind == "call_function":
                return target(*cargs, **ckwargs)
            if kind == "call_method":
                return getattr(cargs[0], target)(*cargs[1:], **ckwargs)
            return self.root.get_submodule(target)(*cargs, **ckwargs)

    def specialize(self, proxy: torch.fx.Proxy, fn: Any) -> Any:
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
        where = None
        for frame in traceback.extract_stack():
            name = os.path.abspath(frame.filename)
            if not (frame.filename.startswith("<") or name.startswith(_TORCH_DIR) or name == _THIS_FILE):
                where = f"{frame.filename}:{frame.lineno}"
        self.notes.append(f"{what} at {where}")


# ----------------------------------------------------------------------------------------------
# the leaf-finding loop


def trace_with_leaves(
    work: torch.nn.Module, args: tuple, requested: dict[str, meta.LeafInfo], *, auto: bool
) -> tuple[torch.fx.GraphModule, list[meta.LeafInfo], list[str]]:
    """Trace ``work``; in auto mode make failing submodules leaves, then specialize on ``args``."""
    concrete = signature_concrete_args(work, args)
    leaves = dict(requested)
    try:
        gm = _trace_until_done(work, args, leaves, concrete, auto, lambda names: _Tracer(names))
        return gm, list(leaves.values()), []
    except _Failure as failure:
        if not (auto and args and failure.module == ""):
            raise _trace_error(work, failure, auto, bool(args)) from failure.exc
        log.info("the root forward of %s does not trace symbolically (%s); specializing on example_inputs",
                 type(work).__name__, failure)
    params = [n for n in inspect.signature(work.forward).parameters]
    inputs = dict(zip(params, clone_inputs(args)))
    notes: list[str] = []
    leaves = dict(requested)
    try:
        gm = _trace_until_done(work, args, leaves, concrete, auto, lambda names: _ValueTracer(names, inputs, notes))
    except _Failure as failure:
        raise _trace_error(work, failure, auto, True) from failure.exc
    return gm, list(leaves.values()), list(dict.fromkeys(notes))


def _trace_until_done(work, args, leaves, concrete, auto, make_tracer) -> torch.fx.GraphModule:  # noqa: ANN001
    modules = dict(work.named_modules())
    for _ in range(len(modules) + 1):
        tracer = make_tracer(set(leaves))
        try:
            graph = tracer.trace(work, concrete_args=dict(concrete) or None)
        except Exception as exc:
            culprit, location = tracer.culprit(exc), user_location(exc)
            if not auto or culprit == "" or tracer.is_leaf_module(modules[culprit], culprit):
                raise _Failure(exc, culprit, location) from exc
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (at {location})"
            leaves[culprit] = meta.LeafInfo(culprit, type(modules[culprit]).__name__, reason)
            log.info("making %s a leaf: %s", culprit, reason)
            continue
        _restore_argument_names(graph, concrete)
        gm = torch.fx.GraphModule(tracer.root, graph, type(work).__name__)
        if not (auto and args):
            return gm
        with _untouched(gm):
            _, node, exc = run_recording(gm, args)
        culprit = _runtime_culprit(node, tracer) if exc is not None else None
        if culprit is None:
            if exc is not None:
                log.warning("the traced graph fails on example_inputs at node %s: %s", getattr(node, "name", "?"), exc)
            return gm
        leaves[culprit] = meta.LeafInfo(culprit, type(modules[culprit]).__name__, f"traced graph failed: {exc}")
    raise _Failure(RuntimeError("no progress making submodules leaves"), "", None)


def _restore_argument_names(graph: torch.fx.Graph, concrete: dict[str, Any]) -> None:
    """torch.fx names a constant argument ``flag_1``; keep the user's ``flag`` in the signature."""
    for node in graph.find_nodes(op="placeholder"):
        if isinstance(node.target, str) and node.target.endswith("_1") and node.target[:-2] in concrete:
            node.target = node.target[:-2]


def _runtime_culprit(node: torch.fx.Node | None, tracer: _Tracer) -> str | None:
    """The deepest non-leaf module whose traced code produced ``node`` (which failed to run)."""
    stack = [] if node is None else [q for q, _ in node.meta.get("nn_module_stack", {}).values()]
    modules = dict(tracer.root.named_modules())
    for qualname in reversed(stack):
        if qualname and qualname in modules and not tracer.is_leaf_module(modules[qualname], qualname):
            return qualname
    return None


def _trace_error(work: torch.nn.Module, failure: _Failure, auto: bool, has_args: bool) -> TraceError:
    where = f"submodule {failure.module!r}" if failure.module else f"the forward of {type(work).__name__}"
    if not auto:
        hint = 'use mode="auto" to keep untraceable submodules as leaves, or list them in leaf_modules'
    elif not has_args:
        hint = "pass example_inputs so fxopt can specialize the Python control flow on them, or wrap that code in a submodule"
    else:
        hint = "move that code into a submodule (it will become a leaf), or try mode=\"export\""
    at = f" at {failure.location}" if failure.location else ""
    msg = f"cannot trace {where}{at}: {type(failure.exc).__name__}: {failure.exc}. To fix: {hint}"
    return TraceError(msg, module=failure.module, location=failure.location)
