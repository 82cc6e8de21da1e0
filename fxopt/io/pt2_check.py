"""The ``.pt2`` safety check: refuse an exported-program archive that ``torch.export.load`` would run code from.

torch.export.load is not "weights only": it unpickles pickled payloads (use_pickle), falls back to
weights_only=False for sample inputs, evaluates symbolic-shape expressions with sympy (eval) and exec's
shape-guard code when building the module. fxopt.load first checks that a .pt2 archive uses none of that
beyond data: tensors as raw bytes, graph targets that are torch ops, and expressions in a small grammar.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import FxoptError

__all__ = ["check_pt2_archive"]


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
