"""``fxopt.save`` / ``fxopt.load``: backend-native artifacts, loaded without running code from the file.

Formats, chosen by the path's extension:

``.pt2``  an exported program (``torch.export.save``); ``load`` returns a runnable module. Needs
          example inputs: given to ``save``, or built from a GraphModule's recorded input shapes.
          ``torch.export.load`` alone may unpickle and exec data from the file, so ``load`` first checks
          the archive (:func:`check_pt2_archive`) and refuses any file that would do so.
``.pt``   for int8 models (a lowered x86/qnnpack ``QuantizedModel``, or a graph of fxopt's dynamic int8
          modules): a self-contained file of plain data, the graph plus each module's int8 weights and qparams
          (:mod:`fxopt.io.int8_format`); ``load(path)`` rebuilds the module with no ``model`` argument, from
          allowlisted functions and classes only. For other modules,
          weights only: the ``state_dict`` (tensors, no code). A file of tensors cannot describe a
          module's code, so ``load(path, model=skeleton)`` restores the weights into a copy of
          ``skeleton``; without ``model`` it raises and says so. Read with ``torch.load(weights_only=True)``:
          files holding arbitrary pickled objects are refused.
``.onnx`` handed to the ``onnx`` backend; ``.xml`` (+ ``.bin``) to the ``openvino`` backend.

A module lowered by a backend (``fxopt.meta.backend_of(module)``) is saved by that backend's ``save``
when the backend provides one. Backends are found through :mod:`fxopt.registry` (imported lazily by name).
"""

from __future__ import annotations

import copy
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.fx

from .. import meta, registry
from ..errors import FxoptError, UnsupportedError
from ..tracing import as_args
from . import int8_format
from .pt2_check import check_pt2_archive

__all__ = ["save", "load", "check_pt2_archive", "FORMAT_TAG"]

logger = logging.getLogger(__name__)

FORMAT_TAG = "fxopt.state_dict.v1"
_BACKEND_FOR_SUFFIX = {".onnx": "onnx", ".xml": "openvino"}
_SUFFIXES = (".pt2", ".pt", ".onnx", ".xml")


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise UnsupportedError(
            f"fxopt cannot tell the format of {str(path)!r} (extension {suffix or 'none'!r}); "
            f"use one of {', '.join(_SUFFIXES)} (.pt2: exported program, .pt: weights only, "
            f".onnx: ONNX, .xml: OpenVINO IR)")
    return suffix


def _backend(name: str, purpose: str) -> Any:
    try:
        return registry.get(name)
    except ValueError as exc:
        raise UnsupportedError(
            f"{purpose} needs the {name!r} backend, which is not available here "
            f"(available: {', '.join(registry.available()) or 'none'}); install its extra, e.g. "
            f"`pip install fxopt[{name}]`") from exc


def _inputs_from_graph(module: torch.nn.Module) -> tuple | None:
    """Example inputs rebuilt from the shapes/dtypes recorded on a GraphModule's placeholders."""
    if not isinstance(module, torch.fx.GraphModule):
        return None
    args = []
    for node in module.graph.find_nodes(op="placeholder"):
        tm = meta.tensor_meta(node) or node.meta.get("val")  # "val": torch.export's own record
        shape, dtype = getattr(tm, "shape", None), getattr(tm, "dtype", None)
        if shape is None or dtype is None:
            return None
        shape = [int(d) for d in shape]
        args.append(torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    return tuple(args)


def save(module: torch.nn.Module, path: str | Path, example_inputs: Any = None) -> None:
    """Write ``module`` to ``path`` in the format its extension names (see the module docstring)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fxopt.save expects a torch.nn.Module, got {type(module).__name__}")
    path = Path(path)
    suffix = _suffix(path)
    if suffix in (".pt", ".pt2") and int8_format.is_int8_model(module):
        if suffix == ".pt2":
            raise UnsupportedError(
                f"{type(module).__name__} is an int8 model: torch.export cannot export its packed int8 weights to "
                f"{str(path)!r}. Save it as .pt instead: fxopt.save(model, 'model.pt') writes a self-contained int8 "
                f"file that fxopt.load(path) rebuilds without the original model")
        torch.save(int8_format.to_plain(module), path)
        logger.debug("saved int8 model %s", path)
        return
    marker = meta.backend_of(module)
    if marker is not None:
        backend = _backend(marker, f"saving a module lowered by backend {marker!r}")
        if backend.has_saver:
            logger.debug("saving %s through backend %r", path, marker)
            backend.save(module, path)
            return
    if suffix in _BACKEND_FOR_SUFFIX:
        name = _BACKEND_FOR_SUFFIX[suffix]
        _backend(name, f"saving {suffix} files").save(module, path)
        return
    if suffix == ".pt":
        torch.save({"format": FORMAT_TAG, "state_dict": module.state_dict()}, path)
        return
    args = as_args(example_inputs) if example_inputs is not None else _inputs_from_graph(module)
    if args is None:
        raise UnsupportedError(
            f"saving {str(path)!r} as .pt2 exports the module with torch.export, which needs example inputs; "
            f"pass save(module, path, example_inputs=...) (or compile the model with example_inputs so its "
            f"input shapes are recorded)")
    try:
        program = torch.export.export(module, args)
    except Exception as exc:
        raise UnsupportedError(
            f"torch.export could not export {type(module).__name__} for {str(path)!r}: {exc}. Save the weights "
            f"only with a .pt path, or use a backend format (.onnx/.xml)") from exc
    torch.export.save(program, path)


def load(path: str | Path, *, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """Load an artifact written by :func:`save`. Never runs code stored in the file.

    ``model`` is needed for ``.pt`` (weights-only) files: the weights are loaded into a copy of it.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.exists():
        raise FileNotFoundError(f"fxopt.load: no such file {str(path)!r}")
    if suffix in _BACKEND_FOR_SUFFIX:
        name = _BACKEND_FOR_SUFFIX[suffix]
        backend = _backend(name, f"loading {suffix} files")
        loader = getattr(backend, "load", None)
        if not callable(loader):
            raise UnsupportedError(f"backend {name!r} provides no loader for {suffix} files")
        return loader(path)
    if suffix == ".pt2":
        check_pt2_archive(path)
        try:
            return torch.export.load(path).module()
        except Exception as exc:
            raise FxoptError(f"{str(path)!r} is not a readable exported program (.pt2): {exc}") from exc
    return _load_weights(path, model)


def _load_weights(path: Path, model: torch.nn.Module | None) -> torch.nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FxoptError(
            f"refused to load {str(path)!r}: it holds objects other than tensors, and fxopt.load never runs "
            f"code from a file (torch.load weights_only=True). Only load files you trust with torch.load "
            f"directly. Details: {exc}") from exc
    except RuntimeError as exc:
        raise FxoptError(f"{str(path)!r} is not a readable .pt file: {exc}") from exc
    if isinstance(obj, dict) and obj.get("format") == int8_format.FORMAT_TAG:
        if model is not None:
            logger.info("%s is a self-contained int8 file: model= is not needed and is ignored", path)
        return int8_format.from_plain(obj, repr(str(path)))
    state = obj.get("state_dict") if isinstance(obj, dict) and obj.get("format") == FORMAT_TAG else obj
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise FxoptError(f"{str(path)!r} is not a state_dict (a dict of tensors); it cannot be loaded as weights")
    if model is None:
        raise UnsupportedError(
            f"{str(path)!r} holds weights only (a .pt file cannot hold a module's code safely); pass the "
            f"architecture: fxopt.load(path, model=MyModel()), or save to .pt2 to get a self-contained module")
    restored = copy.deepcopy(model)
    try:
        restored.load_state_dict(state)
    except RuntimeError as exc:
        raise FxoptError(f"the weights in {str(path)!r} do not fit {type(model).__name__}: {exc}") from exc
    return restored
