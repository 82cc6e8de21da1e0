"""``fxopt.compile`` and ``fxopt.lower``: the pipeline from nn.Module to an optimized module."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx

from . import meta
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
    backend_obj = None
    if backend is not None:
        from fxopt import backends  # facade-level import: the core never imports backends

        backend_obj = backends.get(backend)  # ValueError for unknown names, before any work
        _check_recipe_backend(passes, backend_obj)

    args = as_args(example_inputs)
    if check is not False and not args:
        raise ValueError("compile(check=...) needs example_inputs to compare outputs with the original model")

    work = copy.deepcopy(model)
    gm = trace(work, args if args else None, leaf_modules=leaf_modules, mode=trace_mode)

    all_instruments: list[Instrument] = [TimingInstrument()]
    if dump_dir is not None:
        all_instruments.append(DumpGraphs(dump_dir))
    if check is not False:
        tolerance = 1e-4 if check is True else float(check)
        with torch.no_grad():
            reference = copy.deepcopy(model)(*args)
        all_instruments.append(NumericsCheck(reference, args, tolerance))
    all_instruments.extend(instruments)

    gm, recs = PassManager(passes, instruments=all_instruments, verify=verify)(gm)
    meta.set_records(gm, recs)
    if backend_obj is None:
        return gm
    lowered = backend_obj.lower(gm)
    meta.set_records(lowered, recs)
    return lowered


def _check_recipe_backend(passes: list, backend_obj: Any) -> None:
    """A recipe prepared for one backend cannot be lowered to another: say so before any work."""
    from fxopt import backends

    for p in passes:
        wanted = getattr(p, "backend", None)
        if not isinstance(wanted, str):
            continue
        if not _same_backend(backends.get(wanted), backend_obj, wanted):
            raise ValueError(
                f"pass {getattr(p, 'name', p)!r} prepares the graph for backend {wanted!r} but compile was asked "
                f"for backend={backend_obj.name!r}; use the same backend in both (e.g. "
                f"fxopt.recipes.static_int8(data, backend={backend_obj.name!r}))"
            )


def _same_backend(prepared: Any, target: Any, prepared_name: str) -> bool:
    """Whether a graph prepared for ``prepared`` can be lowered to ``target`` (a name or object given to
    compile/lower: the same backend, another instance of it, or one that says it accepts the graph)."""
    if prepared is target or prepared.name == target.name:
        return True
    accepts = getattr(target, "accepts_prepared_for", None)
    return bool(callable(accepts) and accepts(prepared_name))


def lower(module: torch.nn.Module, backend: Any) -> torch.nn.Module:
    """Lower a module that ``compile(..., backend=None)`` prepared to ``backend``.

    The input is not mutated.
    """
    from fxopt import backends

    backend_obj = backends.get(backend)
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(
            f"fxopt.lower expects the GraphModule returned by fxopt.compile(..., backend=None), "
            f"got {type(module).__name__}"
        )
    prepared_for = meta.backend_of(module)
    if prepared_for is not None and not _same_backend(backends.get(prepared_for), backend_obj, prepared_for):
        raise ValueError(
            f"this module was prepared for backend {prepared_for!r}; lower it with fxopt.lower(module, "
            f"{prepared_for!r}) or prepare it again for {backend_obj.name!r}"
        )
    work = copy.deepcopy(module)
    lowered = backend_obj.lower(work)
    meta.set_records(lowered, meta.records(module))
    return lowered
