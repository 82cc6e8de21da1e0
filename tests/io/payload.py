"""Reading and rewriting the plain-data payload of an fxopt model file (.pt or .pt2), for the tampering tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch

import fxopt
from fxopt.io import dispatch


def read_payload(path: Path) -> dict:
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)
    return torch.load(io.BytesIO(dispatch._read_pt2_payload(path)), weights_only=True)


def write_payload(payload: dict, path: Path) -> None:
    if path.suffix == ".pt":
        torch.save(payload, path)
    else:
        path.unlink()
        dispatch._write_pt2_payload(payload, path)


def tamper(module: torch.nn.Module, path: Path, edit: Callable[[dict], None]) -> Path:
    """Save ``module`` to ``path``, then apply ``edit`` to the stored payload."""
    fxopt.save(module, path)
    payload = read_payload(path)
    edit(payload)
    write_payload(payload, path)
    return path
