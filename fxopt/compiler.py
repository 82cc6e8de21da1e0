"""``fxopt.compile`` and ``fxopt.lower``: the pipeline from nn.Module to an optimized module."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx

from . import meta, registry
from .compress.eager import eager_model, graph_form, graph_shape
from .pass_base import PassContext
from .pipeline import DumpGraphs, Instrument, NumericsCheck, PassLike, PassManager, TimingInstrument
from .tracing import RootTraceError, as_args, trace
from .untraced_root import keep_untraced

__all__ = ["compile", "lower", "as_args"]

logger = logging.getLogger(__name__)


def compile(
    model: torch.nn.Module,
    passes: Sequence[PassLike] = (),
    *,
    example_inputs: Any = None,
    backend: Any = None,
    check: bool | float = False,
    instruments: Iterable[Instrument] = (),
    dump_dir: str | Path | None = None,
    leaf_modules: Sequence[Any] = (),
    trace_mode: str = "auto",
    verify: bool = True,
    tune: bool = False,
) -> torch.nn.Module:
    """Trace ``model``, run ``passes`` in order, then lower to ``backend`` (if given).

    ``model`` is never mutated: everything happens on a deep copy. ``check=True`` (or a float
    tolerance) compares the outputs with the original model after every modifying pass and raises
    :class:`fxopt.NumericsError` naming the first pass that breaks them. The per-pass records
    (time, stats, notes) are kept on the result: ``fxopt.records(result)``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"fxopt.compile expects a torch.nn.Module, got {type(model).__name__}; wrap functions in an nn.Module"
        )
    if isinstance(passes, (str, bytes)) or not isinstance(passes, Iterable):
        raise TypeError("passes must be a list of fxopt.Pass objects (e.g. fxopt.recipes.fuse())")
    passes = list(passes)
    backend_obj = registry.get(backend) if backend is not None else None  # ValueError for unknown names
    context = PassContext(backend_obj)
    PassManager(passes, context=context).bind()  # a pass contradicting the backend: ValueError before any work

    args = as_args(example_inputs)
    if check is not False and not args:
        raise ValueError("compile(check=...) needs example_inputs to compare outputs with the original model")

    _refuse_quantization_state(model)
    work = copy.deepcopy(model)
    try:
        gm = trace(work, args if args else None, leaf_modules=leaf_modules, mode=trace_mode)
    except RootTraceError as exc:
        if trace_mode != "auto" or not any(getattr(p, "module_level", False) for p in passes):
            raise
        gm = keep_untraced(work, str(exc).split(". To fix:")[0])
    meta.set_example_inputs(gm, args)

    all_instruments: list[Instrument] = [TimingInstrument()]
    if dump_dir is not None:
        all_instruments.append(DumpGraphs(dump_dir))
    if check is not False:
        tolerance = 1e-4 if check is True else float(check)
        with torch.no_grad():
            reference = copy.deepcopy(model)(*args)
        all_instruments.append(NumericsCheck(reference, args, tolerance))
    all_instruments.extend(instruments)

    shape_before = graph_shape(gm)
    gm, recs = PassManager(passes, instruments=all_instruments, verify=verify, context=context)(gm)
    meta.set_records(gm, recs)
    if backend_obj is None:
        # passes that only swapped layers: the user's model with the new layers runs without fx's call overhead
        eager, why = eager_model(model, gm, shape_before, passes, recs, args)
        if eager is None and any(r.modified for r in recs):
            logger.info("fxopt.compile returns the GraphModule: %s", why)
        return gm if eager is None else eager
    simulation = _simulation(gm, backend_obj) if check is not False else None
    lowered = _lower(backend_obj, gm, args if tune else None)
    if simulation is not None:
        _check_lowered(simulation, lowered, args, backend_obj.name)
    meta.set_records(lowered, recs)
    return lowered


def _lower(backend_obj: Any, gm: torch.fx.GraphModule, tune_args: tuple | None) -> torch.nn.Module:
    """Lower; with ``tune_args``, time int8 vs float per int8 region and keep float where int8 loses."""
    if tune_args is None:
        return backend_obj.lower(gm)
    if not tune_args:
        raise ValueError("tune=True times the model on example inputs: pass example_inputs=")
    if getattr(backend_obj, "spec", None) is None:
        raise ValueError(f"tune=True applies to the int8 backends ('x86', 'qnnpack'), not {backend_obj.name!r}")
    from fxopt.backends.tune import tune_lowering

    lowered, notes = tune_lowering(backend_obj, gm, tune_args)
    for note in notes:
        logger.info("lower(tune=True): %s", note)
    return lowered


def _simulation(prepared: torch.fx.GraphModule, backend_obj: Any) -> torch.fx.GraphModule | None:
    """The reference simulation of ``prepared`` for ``backend_obj`` (None when there is nothing to check:
    no int8 quantization in the graph, or the target is the reference itself)."""
    from fxopt.backends.reference import ReferenceBackend
    from fxopt.quant.stubs import QuantStub

    spec = getattr(backend_obj, "spec", None)
    if backend_obj.name == "reference" or spec is None or meta.backend_of(prepared) is None:
        return None
    if not any(isinstance(m, QuantStub) for m in prepared.modules()):
        return None
    return ReferenceBackend(spec).lower(prepared)


def _check_lowered(simulation: torch.fx.GraphModule, lowered: torch.nn.Module, args: tuple, backend: str,
                   tolerance: float | None = None) -> None:
    from .lower_check import DEFAULT_STEPS, check_lowering, check_outputs, has_layer_records, raise_on_divergence

    if not has_layer_records(lowered):  # a runtime backend (onnx, openvino, tflite): compare whole outputs
        check_outputs(simulation, lowered, args, backend)
        return
    result = check_lowering(simulation, lowered, args, tolerance=DEFAULT_STEPS if tolerance is None else tolerance)
    raise_on_divergence(result, backend)


def lower(module: torch.nn.Module, backend: Any, *, check: bool | float = False, tune: bool = False,
          example_inputs: Any = None) -> torch.nn.Module:
    """Lower a module that ``compile(..., backend=None)`` prepared to ``backend``.

    The input is not mutated. ``check=True`` (or a tolerance in quantization steps) runs the lowered module
    beside the float simulation of the same quantization (backend ``"reference"``) on ``example_inputs``
    (default: the inputs ``compile`` traced with) and raises :class:`fxopt.NumericsError` naming the first
    layer that diverges: its op, its qparams and the error in quantization steps.
    ``tune=True`` (int8 backends) times each int8 region against float on the same example inputs and keeps
    float the regions that run faster in float (``fxopt.backends.tune``).
    """
    backend_obj = registry.get(backend)
    if not isinstance(module, torch.fx.GraphModule) and graph_form(module) is not None:
        module = graph_form(module)  # an eager compile result (layers swapped in): lower its graph
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(
            f"fxopt.lower expects the GraphModule returned by fxopt.compile(..., backend=None), "
            f"got {type(module).__name__}"
        )
    prepared_for = meta.backend_of(module)
    if prepared_for is not None and not registry.accepts(prepared_for, backend_obj) \
            and backend_obj.name != "reference":
        raise ValueError(
            f"this module was prepared for backend {prepared_for!r}; lower it with fxopt.lower(module, "
            f"{prepared_for!r}) or prepare it again for {backend_obj.name!r}"
        )
    args = as_args(example_inputs) if example_inputs is not None else meta.example_inputs(module)
    if check is not False and not args:
        raise ValueError("lower(check=...) needs example inputs: pass example_inputs=(x,) (compile records the "
                         "ones it traced with)")
    work = copy.deepcopy(module)
    _eval_for_lowering(work)
    simulation = _simulation(work, backend_obj) if check is not False else None
    lowered = _lower(backend_obj, work, args if tune else None)
    if simulation is not None:
        _check_lowered(simulation, lowered, args, backend_obj.name, None if check is True else float(check))
    meta.set_records(lowered, meta.records(module))
    return lowered


def _eval_for_lowering(work: torch.nn.Module) -> None:
    """A QAT graph still in training mode is switched to eval (on the copy being lowered), with a warning:
    the lowered model computes what the QAT model computes in eval mode (BatchNorm running statistics,
    frozen fake-quant ranges), not what it computes in training mode."""
    from .quant.fake_quant import FakeQuantize

    training = [name or "(root)" for name, m in work.named_modules() if m.training]
    if not training or not any(isinstance(m, FakeQuantize) for m in work.modules()):
        return
    message = (
        "fxopt.lower: the QAT module is in training mode; lowering switches it to eval mode (BatchNorm running "
        "statistics, fake-quant ranges as last observed). Call module.eval() before lowering, and compare the "
        "lowered model with the eval-mode QAT model."
    )
    warnings.warn(message, UserWarning, stacklevel=3)
    logger.warning(message)
    work.eval()


def _refuse_quantization_state(model: torch.nn.Module) -> None:
    """Tracing a prepared / calibrated / QAT module again would silently drop its stubs, observers and
    fake quantizers (they are identities in float): refuse, and say what to do instead."""
    from .quant.fake_quant import FakeQuantize
    from .quant.observers import Observer
    from .quant.stubs import DeQuantStub, QuantStub

    found = [name for name, m in model.named_modules() if isinstance(m, (Observer, FakeQuantize, QuantStub, DeQuantStub))]
    if not found:
        return
    calibrated = any(isinstance(m, Observer) and m.calibrated for m in model.modules())
    qat = any(isinstance(m, FakeQuantize) for m in model.modules())
    state = "prepared for QAT" if qat else ("statically calibrated" if calibrated else "prepared for static int8")
    from .errors import UnsupportedError

    raise UnsupportedError(
        f"fxopt.compile got a module that is already {state} ({', '.join(found[:3])}...): compiling it again would "
        "drop that state. Lower it with fxopt.lower(module, backend), or start QAT / quantization from the float "
        "model (e.g. fxopt.compile(model, fxopt.recipes.qat()))"
    )
