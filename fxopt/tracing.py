"""Tracing a model to a ``torch.fx.GraphModule``: symbolic, auto (leaves where needed) and export.

``mode="auto"`` traces symbolically; when that fails it finds the deepest module whose own code
raised (the tracer keeps the module call stack), makes that module a leaf and tries again, each time
on a fresh deep copy of the model. When the failing code is the root's own ``forward`` (detection
models iterate over their list of images, call ``len()`` and branch on values) and ``example_inputs``
are given, it traces again with proxies that also carry their value on the example inputs: ``bool()``,
``len()``, iteration, ``int()``/``float()`` then resolve to those values, and untraceable submodules
become leaves that run on real values. A module *method* the root calls directly that cannot run on
proxies (``SSD.postprocess_detections``) becomes a leaf too, a ``fxopt_island_*`` submodule.

Limits, stated plainly:

- A graph traced with example values is *specialized* on them: number of images, image size (the
  detection transform's resize factors), and every branch taken on data (e.g. how many boxes pass the
  score threshold). :func:`fxopt.meta.trace_notes` lists each specialization with its source line; the
  graph is exact for inputs that take the same decisions, not for others.
- ``isinstance(x, torch.Tensor)`` is false for a proxy. Code that raises because of it becomes a leaf;
  code that silently takes another branch is caught by comparing the graph's outputs with the model's
  on the examples (a note and a warning, since it cannot be located).
- An island keeps a reference to the module that owns the method (outside ``_modules``); tensors that
  only the owner holds don't follow ``gm.to(...)``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import operator
import os
import traceback
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from . import meta
from .errors import TraceError

__all__ = ["trace", "untraced", "MODES"]

log = logging.getLogger(__name__)

MODES = ("auto", "symbolic", "export")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FXOPT_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


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
        raise TypeError(
            f"fxopt.trace expects a torch.nn.Module, got {type(model).__name__}; wrap functions in an nn.Module"
        )
    if mode not in MODES:
        raise ValueError(f"unknown trace mode {mode!r}; choose one of {', '.join(MODES)}")
    args = as_args(example_inputs)
    requested = _requested_leaves(model, leaf_modules)
    if mode == "export":
        if requested:
            raise TraceError('leaf_modules needs mode="auto" or mode="symbolic"; torch.export has no leaves')
        work = copy.deepcopy(model)
        with _untouched(work):
            gm, leaves, notes = _export(work, args), [], []
    else:
        gm, leaves, notes = trace_with_leaves(model, args, requested, auto=(mode == "auto"))
    gm.training = model.training  # the root's flag only; submodules keep theirs
    meta.set_leaves(gm, leaves)
    meta.set_trace_notes(gm, notes)
    if args and mode != "auto":  # auto mode already ran the graph on the examples, filling the metadata
        propagate_shapes(gm, args)
    log.info("traced %s (%s): %d nodes, %d leaves", type(model).__name__, mode, len(gm.graph.nodes), len(leaves))
    return gm


def untraced(gm: torch.nn.Module) -> list[str]:
    """Qualified names of the submodules the tracer kept as leaves (see ``fxopt.meta.leaves`` for why)."""
    return [info.qualname for info in meta.leaves(gm)]


# ----------------------------------------------------------------------------------------------
# helpers


def as_args(example_inputs: Any) -> tuple:
    """Normalize example inputs: one tensor → ``(tensor,)``; a list/tuple → positional arguments."""
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


def _is_user_file(filename: str) -> bool:
    """Model code: not generated, not torch's, not fxopt's."""
    path = os.path.abspath(filename)
    return not (filename.startswith("<") or path.startswith(_TORCH_DIR) or path.startswith(_FXOPT_DIR))


def user_location(exc: BaseException) -> str | None:
    """``file:line`` of the innermost traceback frame outside torch and fxopt, if any."""
    location = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if not _is_user_file(frame.filename):
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


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.fx.Proxy):
        return fn(value)
    if _rebuildable(value):
        return type(value)(**{k: _map(v, fn) for k, v in vars(value).items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _map(v, fn)) for k, v in value.items())
    if isinstance(value, slice):
        return slice(_map(value.start, fn), _map(value.stop, fn), _map(value.step, fn))
    return value


class _MethodIsland(torch.nn.Module):
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


def _method_island_candidate(exc: BaseException, root: torch.nn.Module) -> tuple[str, str] | None:
    """(owner qualname, method) of the outermost non-forward module method in the failing call chain."""
    by_id = {id(m): name for name, m in root.named_modules()}
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        code = tb.tb_frame.f_code.co_name
        plain_method = inspect.isfunction(inspect.getattr_static(type(owner), code, None))
        if isinstance(owner, torch.nn.Module) and id(owner) in by_id and plain_method:
            if code != "forward" and not code.startswith("__") and code not in _MODULE_INTERNALS:
                return by_id[id(owner)], code
        tb = tb.tb_next
    return None


class _ValueTracer(_Tracer):
    """Computes every node on the example inputs while tracing; specializes Python control flow."""

    def __init__(self, leaves: set[str], inputs: dict[str, Any], notes: list[str], islands: dict[str, tuple[str, str]]):
        super().__init__(leaves | set(islands))
        self.inputs = inputs
        self.notes = notes
        self.islands = islands
        self.values: dict[torch.fx.Node, Any] = {}
        self.evaluating = False  # while True, modules run for real (torch.fx's patches step aside)

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self.evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self.evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def trace(self, root: Any, concrete_args: Any = None) -> torch.fx.Graph:
        patched = []
        for island, (owner_name, method) in self.islands.items():
            owner = root.get_submodule(owner_name)
            if not hasattr(root, island):
                root.add_module(island, _MethodIsland(owner, method))
            owner.__dict__[method] = self._island_caller(island)
            patched.append((owner, method))
        try:
            return super().trace(root, concrete_args)
        finally:
            for owner, method in patched:
                del owner.__dict__[method]

    def _island_caller(self, island: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.create_proxy("call_module", island, args, kwargs)

        return call

    def create_arg(self, a: Any) -> Any:
        if _rebuildable(a):  # rebuilt in the graph by calling its class with its attributes
            return self.create_proxy("call_function", type(a), (), dict(vars(a))).node
        return super().create_arg(a)

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
        cargs, ckwargs = _map(args, self.value_of), _map(kwargs, self.value_of)
        self.evaluating = True
        try:
            with torch.no_grad():
                return self._run(kind, target, cargs, ckwargs)
        finally:
            self.evaluating = False

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.inputs[target] if target in self.inputs else (args[0] if args else None)
        if kind == "get_attr":
            obj: Any = self.root
            for part in target.split("."):
                obj = getattr(obj, part)
            return obj
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return self.root.get_submodule(target)(*args, **kwargs)

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
            if _is_user_file(frame.filename):
                where = f"{frame.filename}:{frame.lineno}"
        self.notes.append(f"{what} at {where}")


# ----------------------------------------------------------------------------------------------
# the leaf-finding loop


def trace_with_leaves(
    model: torch.nn.Module, args: tuple, requested: dict[str, meta.LeafInfo], *, auto: bool
) -> tuple[torch.fx.GraphModule, list[meta.LeafInfo], list[str]]:
    """Trace a copy of ``model``; in auto mode make failing submodules leaves, then specialize on ``args``.

    Every attempt traces a fresh deep copy: tracing runs the model's Python, which may store proxies
    in module attributes (torchvision's ``AnchorGenerator`` caches its anchors, for one).
    """
    concrete = signature_concrete_args(model, args)
    expected = _eager_output(model, args) if auto and args else None
    notes: list[str] = []
    job = dict(args=args, concrete=concrete, auto=auto, expected=expected, notes=notes)
    leaves = dict(requested)
    try:
        gm = _trace_until_done(model, _Tracer, **job, leaves=leaves)
        return gm, list(leaves.values()), notes
    except _Failure as failure:
        if not (auto and args and failure.module == ""):
            raise _trace_error(model, failure, auto, bool(args)) from failure.exc
        log.info("the forward of %s does not trace symbolically (%s); specializing on example_inputs",
                 type(model).__name__, failure)
    params = list(inspect.signature(model.forward).parameters)
    islands: dict[str, tuple[str, str]] = {}
    leaves = dict(requested)

    def value_tracer(names: set[str]) -> _ValueTracer:
        return _ValueTracer(names, dict(zip(params, clone_inputs(args))), notes, islands)

    try:
        gm = _trace_until_done(model, value_tracer, **job, leaves=leaves)
    except _Failure as failure:
        raise _trace_error(model, failure, auto, True) from failure.exc
    return gm, list(leaves.values()), list(dict.fromkeys(notes))


def _eager_output(model: torch.nn.Module, args: tuple) -> Any:
    """What the model itself returns on the examples (the reference a traced graph must reproduce)."""
    work = copy.deepcopy(model)
    try:
        with _untouched(work), torch.no_grad():
            torch.manual_seed(0)
            return work(*clone_inputs(args))
    except Exception as exc:
        raise TraceError(
            f"{type(work).__name__} raises on example_inputs: {type(exc).__name__}: {exc}. "
            "Pass inputs the model accepts: one tensor or a tuple of positional arguments "
            "(a detection model takes ([image],))",
            location=user_location(exc),
        ) from exc


def _same(a: Any, b: Any) -> bool:
    """Same leaves (the containers may differ: torch.fx's Interpreter returns immutable lists)."""
    flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    if len(flat_a) != len(flat_b):
        return False
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor):
            continue
        if x.shape != y.shape or not torch.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True):
            return False
    return True


def _trace_until_done(
    model: torch.nn.Module,
    make_tracer: Callable[[set[str]], _Tracer],
    *,
    args: tuple,
    leaves: dict[str, meta.LeafInfo],
    concrete: dict[str, Any],
    auto: bool,
    expected: Any,
    notes: list[str],
) -> torch.fx.GraphModule:
    """Trace until it works, adding to ``leaves`` (auto mode) the module that failed each time."""
    for _ in range(len(list(model.modules())) + 1):
        work = copy.deepcopy(model)
        modules = dict(work.named_modules())
        tracer = make_tracer(set(leaves))
        try:
            with _untouched(work):
                graph = tracer.trace(work, concrete_args=dict(concrete) or None)
        except Exception as exc:
            culprit, location = tracer.culprit(exc), user_location(exc)
            candidate = _method_island_candidate(exc, work) if isinstance(tracer, _ValueTracer) else None
            if culprit == "" and candidate is not None and _island_name(*candidate) not in tracer.islands:
                island = _island_name(*candidate)
                tracer.islands[island] = candidate
                owner = modules[candidate[0]]
                what = f"{type(owner).__name__}.{candidate[1]}"
                reason = f"method {what} runs on real values: {type(exc).__name__}: {exc} (at {location})"
                leaves[island] = meta.LeafInfo(island, what, reason)
                log.info("keeping %s as an island: %s", island, reason)
                continue
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
            torch.manual_seed(0)
            out, node, exc = run_recording(gm, args)
        culprit = _runtime_culprit(node, tracer) if exc is not None else None
        if culprit is not None:
            leaves[culprit] = meta.LeafInfo(culprit, type(modules[culprit]).__name__, f"traced graph failed: {exc}")
            continue
        if exc is not None:
            notes.append(f"the traced graph fails on example_inputs at node {getattr(node, 'name', '?')}: {exc}")
        elif not _same(out, expected):
            notes.append("the traced graph's outputs differ from the model's on example_inputs")
        if exc is not None or not _same(out, expected):
            log.warning("%s: %s", type(work).__name__, notes[-1])
        return gm
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
        hint = (
            "pass example_inputs so fxopt can specialize the Python control flow on them, "
            "or move that code into a submodule"
        )
    else:
        hint = "move that code into a submodule (it will become a leaf), or try mode=\"export\""
    at = f" at {failure.location}" if failure.location else ""
    msg = f"cannot trace {where}{at}: {type(failure.exc).__name__}: {failure.exc}. To fix: {hint}"
    return TraceError(msg, module=failure.module, location=failure.location)
