"""``fxopt.save`` / ``fxopt.load``: backend-native artifacts, loaded without running code from the file.

Formats, chosen by the path's extension:

``.pt``   a self-contained file of plain data for everything ``fxopt.compile`` returns with a PyTorch backend
          (float, fused, fp16, dynamic int8 graphs and lowered static int8 ``QuantizedModel`` models, x86 and
          qnnpack): the graph plus each module's class name and weights (:mod:`fxopt.io.envelope`), written
          with ``torch.save``. ``load(path)`` rebuilds the module with no ``model`` argument, from allowlisted
          functions and classes only, and refuses anything else with :class:`fxopt.UnsupportedError` before
          building anything. An eager (untraced) module cannot be described as data: for those ``.pt`` holds
          the ``state_dict`` and ``load(path, model=skeleton)`` restores the weights into a copy of ``skeleton``.
``.pt2``  for a compiled module: the same plain-data payload inside a PT2 archive (the zip layout of
          ``torch.export.save``, entry ``extra/fxopt_model.pt``; int8 modules cannot go through
          ``torch.export``: their weights are packed C++ objects). For an eager module: an exported program
          (``torch.export.save``, needs example inputs); ``torch.export.load`` alone may unpickle and exec data
          from such a file, so ``load`` first checks the archive (:func:`check_pt2_archive`) and refuses any
          file that would do so.
``.onnx`` handed to the ``onnx`` backend; ``.xml`` (+ ``.bin``) to the ``openvino`` backend; ``.tflite`` to
          the ``tflite`` backend.

Every ``.pt`` read goes through ``torch.load(weights_only=True)``: files holding pickled objects are refused.

A module lowered by a backend (``fxopt.meta.backend_of(module)``) is saved by that backend's ``save``
when the backend provides one. Backends are found through :mod:`fxopt.registry` (imported lazily by name).
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.fx

from .. import meta, registry
from ..errors import FxoptError, UnsupportedError
from ..tracing import as_args
from ..compress.eager import graph_form
from . import envelope
from .pt2_check import check_pt2_archive

__all__ = ["save", "load", "check_pt2_archive", "FORMAT_TAG"]

logger = logging.getLogger(__name__)

FORMAT_TAG = "fxopt.state_dict.v1"  # weights-only .pt of an eager module
PT2_ENTRY = "extra/fxopt_model.pt"  # the envelope inside a .pt2 archive
_BACKEND_FOR_SUFFIX = {".onnx": "onnx", ".xml": "openvino", ".tflite": "tflite"}
_SUFFIXES = (".pt2", ".pt", ".onnx", ".xml", ".tflite")


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise UnsupportedError(
            f"fxopt cannot tell the format of {str(path)!r} (extension {suffix or 'none'!r}); "
            f"use one of {', '.join(_SUFFIXES)} (.pt / .pt2: PyTorch, "
            f".onnx: ONNX, .xml: OpenVINO IR, .tflite: TFLite)")
    return suffix


def _backend(name: str, purpose: str) -> Any:
    try:
        return registry.get(name)
    except ValueError as exc:
        raise UnsupportedError(
            f"{purpose} needs the {name!r} backend, which is not available here "
            f"(available: {', '.join(registry.available()) or 'none'}); install its extra, e.g. "
            f"`pip install fxopt[{name}]`") from exc


def save(module: torch.nn.Module, path: str | Path, example_inputs: Any = None) -> None:
    """Write ``module`` to ``path`` in the format its extension names (see the module docstring).

    ``example_inputs`` is only used to export an eager (untraced) module to ``.pt2``.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fxopt.save expects a torch.nn.Module, got {type(module).__name__}")
    path = Path(path)
    suffix = _suffix(path)
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
    graph = graph_form(module)  # an eager compile result: its GraphModule is what .pt/.pt2 store whole
    if graph is not None and not envelope.is_graph_model(module):
        module = graph
    if envelope.is_graph_model(module):
        payload = envelope.to_plain(module)  # raises before the file is touched
        if suffix == ".pt":
            torch.save(payload, path)
        else:
            _write_pt2_payload(payload, path)
        logger.debug("saved %s (%s)", path, type(module).__name__)
        return
    if suffix == ".pt":
        torch.save({"format": FORMAT_TAG, "state_dict": module.state_dict()}, path)
        return
    args = as_args(example_inputs) if example_inputs is not None else None
    if args is None:
        raise UnsupportedError(
            f"saving the eager module {type(module).__name__} to {str(path)!r} exports it with torch.export, which "
            f"needs example inputs; pass save(module, path, example_inputs=...), or save what fxopt.compile "
            f"returns (a graph, stored without inputs)")
    try:
        program = torch.export.export(module, args)
    except Exception as exc:
        raise UnsupportedError(
            f"torch.export could not export {type(module).__name__} for {str(path)!r}: {exc}. Save the weights "
            f"only with a .pt path, compile it with fxopt first, or use a backend format (.onnx/.xml)") from exc
    torch.export.save(program, path)


def _write_pt2_payload(payload: dict, path: Path) -> None:
    from torch.export.pt2_archive._package import PT2ArchiveWriter

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with PT2ArchiveWriter(str(path)) as archive:
        archive.write_bytes(PT2_ENTRY, buffer.getvalue())


def _read_pt2_payload(path: Path) -> bytes | None:
    """The envelope bytes of a .pt2 written from a compiled module, or ``None`` for an exported program."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [n for n in archive.namelist() if n.split("/", 1)[-1] == PT2_ENTRY]
            return archive.read(entries[0]) if len(entries) == 1 else None
    except zipfile.BadZipFile as exc:
        raise FxoptError(f"{str(path)!r} is not a .pt2 archive (not a zip file)") from exc


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
        payload = _read_pt2_payload(path)
        if payload is not None:
            return _load_pt(io.BytesIO(payload), str(path), model)
        check_pt2_archive(path)
        try:
            return torch.export.load(path).module()
        except Exception as exc:
            raise FxoptError(f"{str(path)!r} is not a readable exported program (.pt2): {exc}") from exc
    return _load_pt(path, str(path), model)


def _load_pt(source: Path | io.BytesIO, name: str, model: torch.nn.Module | None) -> torch.nn.Module:
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FxoptError(
            f"refused to load {name!r}: it holds objects other than tensors, and fxopt.load never runs "
            f"code from a file (torch.load weights_only=True). Only load files you trust with torch.load "
            f"directly. Details: {exc}") from exc
    except RuntimeError as exc:
        raise FxoptError(f"{name!r} is not a readable .pt file: {exc}") from exc
    if isinstance(obj, dict) and obj.get("format") in envelope.FORMAT_TAGS:
        if model is not None:
            logger.info("%s is a self-contained fxopt file: model= is not needed and is ignored", name)
        return envelope.from_plain(obj, repr(name))
    state = obj.get("state_dict") if isinstance(obj, dict) and obj.get("format") == FORMAT_TAG else obj
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise FxoptError(f"{name!r} is not a state_dict (a dict of tensors); it cannot be loaded as weights")
    if model is None:
        raise UnsupportedError(
            f"{name!r} holds weights only (a .pt file cannot hold a module's code safely); pass the "
            f"architecture: fxopt.load(path, model=MyModel()), or save what fxopt.compile returns, which .pt stores whole")
    restored = copy.deepcopy(model)
    try:
        restored.load_state_dict(state)
    except RuntimeError as exc:
        raise FxoptError(f"the weights in {name!r} do not fit {type(model).__name__}: {exc}") from exc
    return restored
