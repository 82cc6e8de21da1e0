"""Models, variants and sizes shared by the latency and compile-time suites (bench_latency.py, bench_compile.py).

``FXOPT_BENCH_SMOKE=1`` (what ``.ci/run`` sets, with ``--benchmark-disable``) shrinks everything so the suites
run in a few minutes and cannot rot: resnet18 and a smaller encoder only, 64x64 images, 2 calibration batches.

Variants are discovered, not listed: every recipe below whose name ``fxopt.recipes`` exports, and static int8 on
every available backend that can lower it (``fxopt.backends.available()``, aliases collapsed).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torchvision

import fxopt
from fxopt import backends, recipe_args

SMOKE = os.environ.get("FXOPT_BENCH_SMOKE", "") not in ("", "0")
IMAGE = 64 if SMOKE else 224
# Smoke mode keeps one CNN and the encoder: every code path (each recipe x backend, both batch sizes, the
# JSON extra_info) still runs, in about the time CI can spare.
CNNS = ["resnet18"] if SMOKE else ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"]
MODELS = [*CNNS, "encoder"]
BATCHES = [1, 8]


class Encoder(nn.Module):
    """A transformer encoder over token ids (BERT-small-like): embedding, N layers, mean-pool, classifier."""

    def __init__(self, vocab: int = 1000, d_model: int = 256, heads: int = 4, layers: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


@functools.lru_cache(maxsize=None)
def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "encoder":
        return (Encoder(d_model=128, layers=2) if SMOKE else Encoder()).eval()
    m = torchvision.models.get_model(name, weights=None)
    m.train()
    with torch.no_grad():  # BatchNorm statistics that have seen data, as after training
        for _ in range(1 if SMOKE else 3):
            m(torch.randn(4, 3, IMAGE, IMAGE))
    return m.eval()


def inputs(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if name == "encoder":
        return torch.randint(0, 1000, (batch, 32 if SMOKE else 128), generator=gen)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)


# Backends whose lowered module is not a float-in/float-out drop-in to time beside the others.
_NOT_TIMED = {"reference": "a float simulation of int8, for checking lowerings",
              "edgetpu": "full-integer export: uint8 inputs and outputs"}


def lowering_backends() -> list[str]:
    """Available backends, each once (aliases dropped). A build a backend cannot do is skipped at run time."""
    seen, out = [], []
    for name in backends.available():
        if name in _NOT_TIMED:
            continue
        obj = backends.get(name)
        if any(obj is s for s in seen):
            continue
        seen.append(obj)
        out.append(getattr(obj, "name", "") or name)
    return out


# Recipes that are the wrong tool for a model kind (dynamic int8 only touches a CNN's classifier), and QAT,
# whose prepared graph needs training data and a fine-tune before lowering (the demo runs it on digits).
_NOT_FOR = {"encoder": {"static_int8", "fuse", "qat"}, "cnn": {"dynamic_int8", "qat"}}


def variants(name: str) -> list[tuple[str, str | None]]:
    """(recipe, backend) pairs measured for ``name``: ``("float", None)`` first, then every recipe of
    ``fxopt.recipes`` that needs no options, crossed with every backend when it targets one."""
    out: list[tuple[str, str | None]] = [("float", None)]
    skip = _NOT_FOR["encoder" if name == "encoder" else "cnn"]
    for recipe in recipe_args.recipe_names():
        if recipe in skip or recipe_args.required_options(recipe):
            continue
        if recipe_args.targets_backend(recipe):
            out += [(recipe, b) for b in lowering_backends()]
        else:
            out.append((recipe, None))
    return out


def variant_id(recipe: str, backend: str | None) -> str:
    return recipe + (f"@{backend}" if backend else "")


def calibration(name: str) -> list[torch.Tensor]:
    return [inputs(name, 4, seed=10 + i) for i in range(2 if SMOKE else 4)]


def build(name: str, recipe: str, backend: str | None) -> nn.Module:
    """The optimized module (trace + passes + calibration + lowering), uncached: what compile-time suites time."""
    m = model(name)
    if recipe == "float":
        return m
    calib = calibration(name) if recipe_args.needs_calibration(recipe) else None
    module, _ = recipe_args.compile_recipes(m, [(recipe, {})], backend, (inputs(name, 1),), calib)
    return module


@functools.lru_cache(maxsize=8)
def built(name: str, recipe: str, backend: str | None) -> nn.Module:
    return build(name, recipe, backend)


@functools.lru_cache(maxsize=None)
def extra_info(name: str, recipe: str, backend: str | None) -> dict:
    """Bytes (stored) and SQNR vs float (dB, on 2 held-out batches), for the benchmark JSON."""
    m = built(name, recipe, backend)
    test = [inputs(name, 4, seed=100 + i) for i in range(2)]
    sqnr = fxopt.compare(model(name), m, test).sqnr_db if recipe != "float" else float("inf")
    return {"model": name, "recipe": recipe, "backend": backend or "eager", "bytes": fxopt.report(m).total_bytes,
            "sqnr_db": round(sqnr, 2) if sqnr != float("inf") else "inf", "image": IMAGE, "smoke": SMOKE}
