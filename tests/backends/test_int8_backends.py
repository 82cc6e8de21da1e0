"""The x86 / qnnpack backend objects: support tables as data, supports(), and the passes end to end."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import fxopt
from fxopt import backends, meta
from fxopt import passes as fp
from fxopt.quant.nn import int8 as qm
from fxopt.backends.qnnpack import QnnpackBackend
from fxopt.backends.x86 import X86Backend
from fxopt.report import report
from tests.helpers import sqnr

warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")


def test_specs_are_readable_data():
    x86, qnn = backends.get("x86").spec, backends.get("qnnpack").spec
    assert backends.get("fbgemm") is backends.get("x86")
    assert x86.engine in ("x86", "fbgemm") and qnn.engine == "qnnpack"
    assert not x86.activation.reduce_range and X86Backend(reduce_range=True).spec.activation.reduce_range
    assert not qnn.activation.reduce_range
    assert qnn.weight.qrange == (-127, 127) and qnn.weight.per_channel and not qnn.weight_per_tensor.per_channel
    assert x86.rule("conv2d").per_channel and "relu" in x86.rule("conv2d").fused_activations
    assert not QnnpackBackend(per_channel=False).spec.rule("linear").per_channel
    assert x86.rule("max_pool3d").kind == "share" and qnn.rule("max_pool3d") is None
    assert x86.rule("sigmoid").fixed_qparams == (1 / 256, 0)
    assert x86.rule("embedding").kind == "weight_only"
    assert x86.max_range_ratio == 100.0


def test_supports_gives_reasons():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.MaxPool3d(1))
    gm = fxopt.trace(model)
    conv, gelu, pool = [n for n in gm.graph.nodes if n.op == "call_module"]
    x86, qnn = backends.get("x86"), backends.get("qnnpack")
    assert x86.supports(conv).ok and "compute" in x86.supports(conv).reason
    assert not x86.supports(gelu) and "stays float" in x86.supports(gelu).reason
    assert x86.supports(pool).ok and not qnn.supports(pool).ok


def _fused_conv_key():
    from fxopt.backends.spec import op_key

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    gm = fp.FuseActivations()(fxopt.trace(model)).graph_module
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    return op_key(node, gm)


def test_fused_modules_have_op_keys():
    assert _fused_conv_key() == "conv2d"


def _zoo_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    model.train()
    with torch.no_grad():  # realistic BN statistics
        for _ in range(2):
            model(torch.randn(8, 3, 64, 64))
    return model.eval()


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
# size bound: int8 weights are 25% of float; per-channel qparams (torch stores an 8-byte scale and an
# 8-byte zero point per channel) and float32 biases add ~2.4% on mobilenet_v2's thin layers
@pytest.mark.parametrize("name,min_sqnr,max_size", [("resnet18", 20.0, 0.27), ("mobilenet_v2", 25.0, 0.28)])
def test_zoo_static_int8_end_to_end(name, min_sqnr, max_size, backend):
    model = _zoo_model(name)
    calib = [torch.randn(4, 3, 64, 64) for _ in range(3)]
    prepared = fxopt.compile(model, [fp.FoldBatchNorm(), fp.FuseActivations(), fp.InsertQuantStubs(backend=backend),
                                     fp.PlaceObservers(activation="minmax"), fp.Calibrate(calib)],
                             example_inputs=(calib[0],))
    q = fxopt.lower(prepared, backend)
    assert meta.backend_of(q) == backend
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in q.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > min_sqnr
        assert q(x[:1]).shape == (1, 1000)
    assert report(q).total_bytes <= max_size * report(model).total_bytes


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_sqnr_not_worse_than_torch_ao(name, backend):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = _zoo_model(name)
    calib = [torch.randn(4, 3, 64, 64) for _ in range(8)]
    x = torch.randn(8, 3, 64, 64)
    q = fxopt.compile(model, [fp.FoldBatchNorm(), fp.FuseActivations(), fp.InsertQuantStubs(backend=backend),
                              fp.PlaceObservers(), fp.Calibrate(calib)], example_inputs=(x,), backend=backend)
    engine = backends.get(backend).spec.engine
    with qm.engine_scope(engine):
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(engine), (x,))
        with torch.no_grad():
            for c in calib:
                prepared(c)
        ref = convert_fx(prepared)
        with torch.no_grad():
            ao = sqnr(model(x), ref(x))
    with torch.no_grad():
        ours = sqnr(model(x), q(x))
    assert ours >= ao - 1.0, (ours, ao)
