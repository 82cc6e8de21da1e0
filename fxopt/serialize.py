"""``fxopt.save`` / ``fxopt.load``: backend-native artifacts, loaded without running code from the file.

Formats, chosen by the path's extension:

``.pt2``  an exported program (``torch.export.save``); ``load`` returns a runnable module. Needs
          example inputs: given to ``save``, or built from a GraphModule's recorded input shapes.
          ``torch.export.load`` alone may unpickle and exec data from the file, so ``load`` first checks
          the archive (:func:`check_pt2_archive`) and refuses any file that would do so.
``.pt``   for int8 models (a lowered x86/qnnpack ``QuantizedModel``, or a graph of fxopt's dynamic int8
          modules): a self-contained file of plain data, the graph plus each module's int8 weights and qparams
          (:mod:`fxopt.int8_format`); ``load(path)`` rebuilds the module with no ``model`` argument, from
          allowlisted functions and classes only. For other modules,
          weights only: the ``state_dict`` (tensors, no code). A file of tensors cannot describe a
          module's code, so ``load(path, model=skeleton)`` restores the weights into a copy of
          ``skeleton``; without ``model`` it raises and says so. Read with ``torch.load(weights_only=True)``:
          files holding arbitrary pickled objects are refused.
``.onnx`` handed to the ``onnx`` backend; ``.xml`` (+ ``.bin``) to the ``openvino`` backend.

A module lowered by a backend (``fxopt.meta.backend_of(module)``) is saved by that backend's ``save``
when the backend provides one. Backends are imported lazily: the core never imports them at import time.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.fx

from . import int8_format, meta
from .tracing import as_args
from .errors import FxoptError, UnsupportedError

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
    from fxopt import backends  # lazy: the core must not import backends at import time

    try:
        return backends.get(name)
    except ValueError as exc:
        raise UnsupportedError(
            f"{purpose} needs the {name!r} backend, which is not available here "
            f"(available: {', '.join(backends.available()) or 'none'}); install its extra, e.g. "
            f"`pip install fxopt[{name}]`") from exc


def _has_own_saver(backend: Any) -> bool:
    from fxopt.backends import Backend

    return type(backend).save is not Backend.save


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
        if _has_own_saver(backend):
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


# --- .pt2 safety -------------------------------------------------------------------------------------
# torch.export.load is not "weights only": it unpickles pickled payloads (use_pickle), falls back to
# weights_only=False for sample inputs, evaluates symbolic-shape expressions with sympy (eval) and exec's
# shape-guard code when building the module. fxopt.load first checks that a .pt2 archive uses none of that
# beyond data: tensors as raw bytes, graph targets that are torch ops, and expressions in a small grammar.

_SAFE_TARGET = re.compile(r"^(torch\.ops\.\w+\.\w+(\.\w+)?|_operator\.\w+|math\.\w+)$")
_EXPR_TOKEN = re.compile(r"\s*(?:([A-Za-z_]\w*)|('[A-Za-z_]\w*')|(\d+(?:\.\d+)?(?:e[-+]?\d+)?)|(\*\*|[-+*/(),=<>!]))")
_EXPR_NAMES = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
    "And", "Or", "Not", "True", "False", "true", "false", "oo", "S", "Piecewise",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "IntTrueDiv", "FloatTrueDiv", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "FloatPow", "PowByNatural", "Identity",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero", "zero",
    "even", "odd", "rational", "extended_real", "commutative", "infinite",
})
_SYMBOL_NAME = re.compile(r"^[a-z]{1,4}\d+$")  # s0, u3, zuf0


class _Refused(FxoptError):
    pass


def _safe_expr(expr: str) -> bool:
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            return expr[pos:].strip() == ""
        name = m.group(1)
        if name is not None and name not in _EXPR_NAMES and not _SYMBOL_NAME.match(name):
            return False
        pos = m.end()
    return True


def _check_graph_json(obj: Any, where: str) -> None:
    if isinstance(obj, dict):
        if "target" in obj and "inputs" in obj and not _SAFE_TARGET.match(str(obj["target"])):
            raise _Refused(f"{where}: graph node target {str(obj['target'])[:80]!r} is not a torch operator")
        if "expr_str" in obj and not _safe_expr(str(obj["expr_str"])):
            raise _Refused(f"{where}: symbolic expression {str(obj['expr_str'])[:80]!r} is not plain arithmetic")
        for value in obj.values():
            _check_graph_json(value, where)
    elif isinstance(obj, list):
        for value in obj:
            _check_graph_json(value, where)


def check_pt2_archive(path: str | Path) -> None:
    """Raise :class:`fxopt.FxoptError` unless loading ``path`` with ``torch.export.load`` runs no code from it."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise FxoptError(f"{str(path)!r} is not a .pt2 archive (not a zip file)") from exc
    with archive:
        try:
            names = _entry_names(archive)
            _check_entries(archive, names)
        except _Refused as exc:
            raise FxoptError(
                f"refused to load {str(path)!r}: {exc}. fxopt.load never runs code from a file; load it with "
                f"torch.export.load only if you trust its source") from None


_ALLOWED = re.compile(r"^(archive_format|archive_version|byteorder|\.data/.+|models/[^/]+\.json|"
                      r"data/(weights|constants)/[^/]+|data/sample_inputs/[^/]+\.pt|extra/.+)$")


def _entry_names(archive: zipfile.ZipFile) -> dict[str, str]:
    """Entries by their name under the archive's single root folder; anything unexpected is refused."""
    full_names = archive.namelist()
    if len(set(full_names)) != len(full_names):
        raise _Refused("it has duplicate entries")
    roots = {n.split("/", 1)[0] for n in full_names}
    names = {n.split("/", 1)[1]: n for n in full_names if "/" in n}
    if len(roots) != 1 or len(names) != len(full_names):
        raise _Refused("it is not in the current torch.export archive format (legacy files unpickle their data)")
    for short in names:
        if not _ALLOWED.match(short):
            raise _Refused(f"it contains an entry fxopt does not load safely ({short})")
    return names


def _check_entries(archive: zipfile.ZipFile, names: dict[str, str]) -> None:
    fmt = archive.read(names["archive_format"]).decode().strip() if "archive_format" in names else ""
    if fmt != "pt2":
        raise _Refused("it is not in the current torch.export archive format (legacy files unpickle their data)")
    for short, full in names.items():
        if short.startswith(("data/weights/", "data/constants/")) and short.endswith(".pt"):
            raise _Refused(f"it holds pickled legacy data ({short})")
        if short.endswith("_config.json") and short.startswith(("data/weights/", "data/constants/")):
            for fqn, payload in json.loads(archive.read(full)).get("config", {}).items():
                custom = str(payload.get("path_name", "")).startswith("custom_obj_")  # torchbind: no Python code
                if payload.get("use_pickle") and not custom:
                    raise _Refused(f"{fqn!r} is stored as a pickled Python object")
        if short.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(archive.read(full)), weights_only=True)
            except Exception as exc:
                raise _Refused(f"its sample inputs are not plain tensors ({type(exc).__name__})") from None
        if short.startswith("models/") and short.endswith(".json"):
            model = json.loads(archive.read(full))
            if model.get("guards_code"):
                raise _Refused("it carries shape-guard code, which torch.export.load would execute")
            _check_graph_json(model, short)
