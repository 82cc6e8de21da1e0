"""``fxopt.compile`` and ``fxopt.lower``: the pipeline from nn.Module to an optimized module."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx

from . import meta, registry
from .pass_base import PassContext
from .pipeline import DumpGraphs, Instrument, NumericsCheck, PassLike, PassManager, TimingInstrument
from .tracing import as_args, trace

__all__ = ["compile", "lower", "as_args"]


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

    work = copy.deepcopy(model)
    gm = trace(work, args if args else None, leaf_modules=leaf_modules, mode=trace_mode)
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

    gm, recs = PassManager(passes, instruments=all_instruments, verify=verify, context=context)(gm)
    meta.set_records(gm, recs)
    if backend_obj is None:
        return gm
    simulation = _simulation(gm, backend_obj) if check is not False else None
    lowered = backend_obj.lower(gm)
    if simulation is not None:
        _check_lowered(simulation, lowered, args, backend_obj.name)
    meta.set_records(lowered, recs)
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
    from .lower_check import DEFAULT_STEPS, check_lowering, raise_on_divergence

    result = check_lowering(simulation, lowered, args, tolerance=DEFAULT_STEPS if tolerance is None else tolerance)
    raise_on_divergence(result, backend)


def lower(module: torch.nn.Module, backend: Any, *, check: bool | float = False,
          example_inputs: Any = None) -> torch.nn.Module:
    """Lower a module that ``compile(..., backend=None)`` prepared to ``backend``.

    The input is not mutated. ``check=True`` (or a tolerance in quantization steps) runs the lowered module
    beside the float simulation of the same quantization (backend ``"reference"``) on ``example_inputs``
    (default: the inputs ``compile`` traced with) and raises :class:`fxopt.NumericsError` naming the first
    layer that diverges: its op, its qparams and the error in quantization steps.
    """
    backend_obj = registry.get(backend)
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(
            f"fxopt.lower expects the GraphModule returned by fxopt.compile(..., backend=None), "
            f"got {type(module).__name__}"
        )
    prepared_for = meta.backend_of(module)
    if prepared_for is not None and not registry.same(prepared_for, backend_obj) and backend_obj.name != "reference":
        raise ValueError(
            f"this module was prepared for backend {prepared_for!r}; lower it with fxopt.lower(module, "
            f"{prepared_for!r}) or prepare it again for {backend_obj.name!r}"
        )
    args = as_args(example_inputs) if example_inputs is not None else meta.example_inputs(module)
    if check is not False and not args:
        raise ValueError("lower(check=...) needs example inputs: pass example_inputs=(x,) (compile records the "
                         "ones it traced with)")
    simulation = _simulation(module, backend_obj) if check is not False else None
    work = copy.deepcopy(module)
    lowered = backend_obj.lower(work)
    if simulation is not None:
        _check_lowered(simulation, lowered, args, backend_obj.name, None if check is True else float(check))
    meta.set_records(lowered, meta.records(module))
    return lowered
