"""Shared helpers for comparing fxopt's static int8 with torch.ao's FX flow (the deprecated reference).

Used by bench/ suites and tests only: library code never touches torch.ao.quantization's flows.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
import torchvision

import fxopt
from fxopt import recipes

ZOO = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_0", "efficientnet_b0",
       "densenet121", "googlenet", "regnet_x_400mf", "squeezenet1_1"]


@contextmanager
def engine(name: str):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def zoo_model(name: str, size: int = 96, seed: int = 0, warm_batches: int = 4) -> torch.nn.Module:
    """A torchvision model with random weights whose BatchNorm statistics have seen data (train mode)."""
    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    model.train()
    with torch.no_grad():
        for _ in range(warm_batches):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def data(size: int, n_calib: int = 8, n_test: int = 4, batch: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    calib = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n_calib)]
    test = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n_test)]
    return calib, test


def fxopt_int8(model, calib, backend: str, observer: str = "histogram"):
    return fxopt.compile(model, recipes.static_int8(calib, backend=backend, observer=observer),
                         example_inputs=(calib[0][:1],), backend=backend)


def torchao_int8(model, calib, backend: str):
    """torch.ao FX static int8 with its default qconfig mapping for the engine (reference only)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    qengine = "x86" if backend == "x86" else "qnnpack"
    with warnings.catch_warnings(), engine(qengine):
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(qengine), (calib[0][:1],))
        with torch.no_grad():
            for batch in calib:
                prepared(batch)
        return convert_fx(prepared)


def sqnr(model, candidate, test, backend: str) -> float:
    qengine = "x86" if backend == "x86" else "qnnpack"
    with engine(qengine):
        return fxopt.compare(model, candidate, test).sqnr_db
