"""Tracing a model to a ``torch.fx.GraphModule``: symbolic, auto (leaves where needed) and export.

``mode="auto"`` traces symbolically; when that fails it finds the deepest module whose own code
raised, makes that module a leaf and tries again, each time on a fresh deep copy of the model. When
the failing code is the root's own ``forward`` and ``example_inputs`` are given, it traces again
with proxies that also carry their value on the examples, and module methods that cannot run on
proxies become "method islands" (see :mod:`fxopt.tracers`). With example inputs, auto mode runs the
traced graph on them and compares its outputs with the model's. When even that fails at the root
(transformers' keyword and output handling), auto mode exports the model with torch.export instead
(:mod:`fxopt.export_frontend`: dynamic dims, module calls lifted back); when that fails too, the
error is a :class:`RootTraceError`, and ``fxopt.compile`` keeps the model as an untraced root for its
module-level passes (:mod:`fxopt.untraced_root`).

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
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from . import export_frontend, meta
from .errors import TraceError
from .tracers import LeafTracer, ValueTracer, user_location

__all__ = ["MODES", "RootTraceError", "trace", "untraced"]

log = logging.getLogger(__name__)

MODES = ("auto", "symbolic", "export")


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
    if isinstance(model, torch.fx.GraphModule) and mode != "export" and not requested:
        return _already_traced(model, args)
    if mode == "export":
        if requested:
            raise TraceError('leaf_modules needs mode="auto" or mode="symbolic"; torch.export has no leaves')
        gm, leaves, notes = _export(model, args), [], []
    else:
        gm, leaves, notes = _trace_with_leaves(model, args, requested, auto=(mode == "auto"))
    gm.training = model.training  # the root's flag only; submodules keep theirs
    meta.set_leaves(gm, leaves)
    meta.set_trace_notes(gm, notes)
    if args and mode != "auto":  # auto mode already ran the graph on the examples, filling the metadata
        _propagate_shapes(gm, args)
    log.info("traced %s (%s): %d nodes, %d leaves", type(model).__name__, mode, len(gm.graph.nodes), len(leaves))
    return gm


def _already_traced(gm: torch.fx.GraphModule, args: tuple) -> torch.fx.GraphModule:
    """A GraphModule (``fxopt.trace``'s, torch.export's) is a graph already: tracing it again would lose
    what its own code generator does (torch.export's output pytree: the output's type). A copy of it."""
    copied = copy.deepcopy(gm)
    if args:
        _propagate_shapes(copied, args)
    return copied


def untraced(gm: torch.nn.Module) -> list[str]:
    """The model's own qualified names of what the tracer kept untraced: module paths, ``module.method``
    for a method island (``"transform.postprocess"``), ``""`` for an untraced root. Why, and where the
    graph calls each one, is in ``fxopt.meta.leaves(gm)``."""
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
            if by_id.get(id(item), "") == "":
                raise TraceError(
                    f"leaf_modules holds a {type(item).__name__} instance that is not a submodule of the model; "
                    "pass a submodule of the model, its qualified name or its type",
                )
            names.append(by_id[id(item)])
        else:
            raise TypeError(f"leaf_modules items must be module types, qualified names or modules, got {item!r}")
    return {n: meta.LeafInfo(n, type(named[n]).__name__, "requested by the user", requested=True) for n in names}


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
                    if name in saved and buf.shape == saved[name].shape and not torch.equal(buf, saved[name]):
                        _restore_buffer(module, name, buf, saved[name])


def _restore_buffer(module: torch.nn.Module, name: str, buf: torch.Tensor, saved: torch.Tensor) -> None:
    """Write ``saved`` back into ``buf``; a buffer whose elements share memory (an expanded tensor, such
    as transformers' ``position_ids``) cannot be written in place and is replaced instead."""
    if torch._debug_has_internal_overlap(buf) == 0:  # 0: no overlap
        buf.copy_(saved)
        return
    owner_path, _, attr = name.rpartition(".")
    module.get_submodule(owner_path)._buffers[attr] = saved


def _clone_inputs(args: tuple) -> tuple:
    """Copies of the example inputs, so that models writing into their inputs don't alter them."""
    return torch.utils._pytree.tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args)


class _RecordingShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, to name the one that fails."""

    current: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _run_recording(gm: torch.fx.GraphModule, args: tuple) -> tuple[Any, torch.fx.Node | None, Exception | None]:
    """Run ``gm`` on ``args`` filling ``node.meta['tensor_meta']``; returns (output, failing node, error)."""
    prop = _RecordingShapeProp(gm)
    try:
        with torch.no_grad():
            return prop.propagate(*_clone_inputs(args)), None, None
    except Exception as exc:  # metadata is best effort: the nodes before the failure keep theirs
        return None, prop.current, exc


def _propagate_shapes(gm: torch.fx.GraphModule, args: tuple) -> None:
    """Shape/dtype metadata on every node that runs on ``args`` (best effort, never raises)."""
    with _untouched(gm):
        _, node, exc = _run_recording(gm, args)
    if exc is not None:
        log.warning("shape propagation stopped at node %s: %s", getattr(node, "name", "?"), exc)


def _export(model: torch.nn.Module, args: tuple) -> torch.fx.GraphModule:
    if not args:
        raise TraceError('mode="export" needs example_inputs: call fxopt.trace(model, (x,), mode="export")')
    work = copy.deepcopy(model)
    try:
        with _untouched(work):
            gm = export_frontend.export(work, _clone_inputs(args))
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


def _signature_concrete_args(module: torch.nn.Module, args: tuple) -> dict[str, Any]:
    """Arguments of ``forward`` that the example inputs don't pass and that have defaults: constants."""
    params = list(inspect.signature(module.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    concrete = {p.name: p.default for p in positional[len(args):] if p.default is not p.empty}
    concrete.update({p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty})
    return concrete


def _eager_output(model: torch.nn.Module, args: tuple) -> Any:
    """What the model itself returns on the examples (the reference a traced graph must reproduce)."""
    work = copy.deepcopy(model)
    try:
        with _untouched(work), torch.no_grad():
            torch.manual_seed(0)
            return work(*_clone_inputs(args))
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


# ----------------------------------------------------------------------------------------------
# the leaf-finding loop


class _Failure(Exception):
    """Tracing failed in a way that making a submodule a leaf cannot fix."""

    def __init__(self, exc: Exception, module: str, location: str | None):
        super().__init__(str(exc))
        self.exc, self.module, self.location = exc, module, location


@dataclasses.dataclass
class _Job:
    """What every attempt of one ``trace`` call shares."""

    model: torch.nn.Module
    args: tuple
    auto: bool
    concrete: dict[str, Any]  # arguments of forward held constant
    expected: Any  # the model's output on args, when the traced graph is checked against it
    notes: list[str]  # for meta.trace_notes

    @property
    def check_on_examples(self) -> bool:
        return self.auto and bool(self.args)


def _trace_with_leaves(
    model: torch.nn.Module, args: tuple, requested: dict[str, meta.LeafInfo], *, auto: bool
) -> tuple[torch.fx.GraphModule, list[meta.LeafInfo], list[str]]:
    """Trace a copy of ``model``; in auto mode make failing submodules leaves, then specialize on ``args``."""
    concrete = _signature_concrete_args(model, args)
    expected = _eager_output(model, args) if auto and args else None
    job = _Job(model, args, auto, concrete, expected, notes=[])
    leaves = dict(requested)
    try:
        gm = _trace_until_done(job, LeafTracer, leaves)
        return gm, list(leaves.values()), job.notes
    except _Failure as failure:
        if not (job.check_on_examples and failure.module == ""):
            raise _trace_error(model, failure, auto, bool(args)) from failure.exc
        log.info("the forward of %s does not trace symbolically (%s); specializing on example_inputs",
                 type(model).__name__, failure)

    params = list(inspect.signature(model.forward).parameters)
    islands: dict[str, tuple[str, str]] = {}  # grows by at most one per attempt

    def value_tracer(names: set[str]) -> ValueTracer:
        return ValueTracer(names, dict(zip(params, _clone_inputs(args))), job.notes, islands)

    leaves = dict(requested)
    try:
        gm = _trace_until_done(job, value_tracer, leaves)
    except _Failure as failure:
        if failure.module != "" or requested:  # torch.export has no leaves to give the user
            raise _trace_error(model, failure, auto=True, has_args=True) from failure.exc
        return _export_instead(job, failure), [], job.notes
    return gm, list(leaves.values()), list(dict.fromkeys(job.notes))


def _export_instead(job: _Job, failure: _Failure) -> torch.fx.GraphModule:
    """Auto mode's last resort when the root's own code defeats torch.fx: the torch.export frontend."""
    why = f"{type(failure.exc).__name__}: {str(failure.exc).splitlines()[0] if str(failure.exc) else ''}"
    at = f" at {failure.location}" if failure.location else ""
    log.info("the forward of %s does not trace with torch.fx (%s); trying torch.export", type(job.model).__name__, why)
    try:
        gm = _export(job.model, job.args)
    except TraceError as exc:
        raise RootTraceError(
            f"cannot trace the forward of {type(job.model).__name__}{at}: {why}; torch.export failed too: "
            f"{str(exc.__cause__ or exc).splitlines()[0]}. To fix: move that code into a submodule (it will "
            "become a leaf). fxopt.compile still runs module-level passes (QuantizeDynamic, ConvertFP16...) "
            "on such a model, kept as an untraced root",
            module="", location=failure.location,
        ) from failure.exc
    job.notes[:] = [
        f"the forward of {type(job.model).__name__} does not trace with torch.fx ({why}{at}); "
        "traced with torch.export: an aten-level graph whose Linear/Conv/Embedding calls are module calls"
    ]
    with _untouched(gm):  # fills shape metadata; a failure or a divergence is noted, as for torch.fx graphs
        torch.manual_seed(0)
        out, node, exc = _run_recording(gm, job.args)
    if exc is not None:
        job.notes.append(f"the exported graph fails on example_inputs at node {getattr(node, 'name', '?')}: {exc}")
    elif not _same(out, job.expected):
        job.notes.append("the exported graph's outputs differ from the model's on example_inputs")
    return gm


def _trace_until_done(
    job: _Job, make_tracer: Callable[[set[str]], LeafTracer], leaves: dict[str, meta.LeafInfo]
) -> torch.fx.GraphModule:
    """Trace until it works, adding to ``leaves`` (auto mode) the module that failed each time.

    Every attempt traces a fresh deep copy: tracing runs the model's Python, which may store proxies
    in module attributes (torchvision's ``AnchorGenerator`` caches its anchors, for one).
    """
    for _ in range(len(list(job.model.modules())) + 1):
        work = copy.deepcopy(job.model)
        modules = dict(work.named_modules())
        tracer = make_tracer({info.attribute or name for name, info in leaves.items()})
        try:
            with _untouched(work):
                graph = tracer.trace(work, concrete_args=dict(job.concrete) or None)
        except Exception as exc:
            leaf = _leaf_for_failure(exc, tracer, modules, job.auto)
            if leaf is None:
                raise _Failure(exc, tracer.culprit(exc), user_location(exc)) from exc
            leaves[leaf.qualname] = leaf
            continue
        _restore_argument_names(graph, job.concrete)
        gm = torch.fx.GraphModule(tracer.root, graph, type(work).__name__)
        if not job.check_on_examples:
            return gm
        leaf = _check_on_examples(gm, tracer, modules, job)
        if leaf is None:
            return gm
        leaves[leaf.qualname] = leaf
    raise _Failure(RuntimeError("no progress making submodules leaves"), "", None)


def _leaf_for_failure(
    exc: Exception, tracer: LeafTracer, modules: dict[str, torch.nn.Module], auto: bool
) -> meta.LeafInfo | None:
    """The leaf for the next attempt after ``exc``: a method island (value tracing) or, in auto
    mode, the module whose code raised; None when no leaf can fix it."""
    culprit, location = tracer.culprit(exc), user_location(exc)
    if culprit == "" and isinstance(tracer, ValueTracer):
        island = tracer.add_island(exc, location)
        if island is not None:
            return island
    if not auto or culprit == "" or tracer.is_leaf_module(modules[culprit], culprit):
        return None
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (at {location})"
    log.info("making %s a leaf: %s", culprit, reason)
    return meta.LeafInfo(culprit, type(modules[culprit]).__name__, reason)


def _check_on_examples(
    gm: torch.fx.GraphModule, tracer: LeafTracer, modules: dict[str, torch.nn.Module], job: _Job
) -> meta.LeafInfo | None:
    """Run ``gm`` on the examples, filling its shape metadata, and compare with the model's output.

    Returns a leaf for the next attempt when a traced module's code fails to run; otherwise notes
    (and logs) a failure or a divergence that no leaf explains, and returns None.
    """
    with _untouched(gm):
        torch.manual_seed(0)
        out, node, exc = _run_recording(gm, job.args)
    if exc is None:
        if _same(out, job.expected):
            return None
        note = "the traced graph's outputs differ from the model's on example_inputs"
    else:
        culprit = _runtime_culprit(node, tracer)
        if culprit is not None:
            return meta.LeafInfo(culprit, type(modules[culprit]).__name__, f"traced graph failed: {exc}")
        note = f"the traced graph fails on example_inputs at node {getattr(node, 'name', '?')}: {exc}"
    job.notes.append(note)
    log.warning("%s: %s", type(job.model).__name__, note)
    return None


def _restore_argument_names(graph: torch.fx.Graph, concrete: dict[str, Any]) -> None:
    """torch.fx names a constant argument ``flag_1``; keep the user's ``flag`` in the signature."""
    for node in graph.find_nodes(op="placeholder"):
        if isinstance(node.target, str) and node.target.endswith("_1") and node.target[:-2] in concrete:
            node.target = node.target[:-2]


def _runtime_culprit(node: torch.fx.Node | None, tracer: LeafTracer) -> str | None:
    """The deepest non-leaf module whose traced code produced ``node`` (which failed to run)."""
    stack = [] if node is None else [q for q, _ in node.meta.get("nn_module_stack", {}).values()]
    modules = dict(tracer.root.named_modules())
    for qualname in reversed(stack):
        if qualname and qualname in modules and not tracer.is_leaf_module(modules[qualname], qualname):
            return qualname
    return None


def _trace_error(model: torch.nn.Module, failure: _Failure, auto: bool, has_args: bool) -> TraceError:
    where = f"submodule {failure.module!r}" if failure.module else f"the forward of {type(model).__name__}"
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
    kind = RootTraceError if failure.module == "" else TraceError
    return kind(msg, module=failure.module, location=failure.location)


class RootTraceError(TraceError):
    """The root's own ``forward`` cannot be traced. ``fxopt.compile`` then keeps the model as an untraced
    root when the pipeline has module-level passes (see :mod:`fxopt.untraced_root`)."""
