"""``convert-fp16``: half the bytes, float32 inputs/outputs, numerics close to float."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxopt
from fxopt import passes as fp
from fxopt.quant.nn.dynamic import DynamicLinear
from fxopt.quant.nn.fp16 import FP16Module
from fxopt.report import report


def sqnr(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # realistic BatchNorm statistics
        for _ in range(2):
            model(torch.randn(8, 3, 64, 64))
    return model.eval()


@pytest.mark.parametrize("compute", ["fp32", "fp16"])
def test_resnet18_halves_size_and_keeps_numerics(resnet18, compute):
    x = torch.randn(2, 3, 64, 64)
    gm = fxopt.trace(resnet18, (x,))
    result = fp.ConvertFP16(compute=compute)(gm)
    assert result.modified
    assert result.stats["Conv2d"] == 20 and result.stats["BatchNorm2d"] == 20 and result.stats["Linear"] == 1
    assert isinstance(gm.conv1, FP16Module) and gm.conv1.module.weight.dtype == torch.float16
    assert isinstance(gm.fc, DynamicLinear) and gm.fc.fxopt_weights()["weight"].dtype == torch.float16
    with torch.inference_mode():
        ref, out = resnet18(x), gm(x)
    assert out.dtype == torch.float32
    assert sqnr(ref, out) > (50 if compute == "fp32" else 40)
    ratio = report(gm).total_bytes / report(resnet18).total_bytes
    assert 0.49 <= ratio <= 0.51
    assert result.stats["bytes_after"] / result.stats["bytes_before"] == pytest.approx(0.5, abs=0.01)


def test_get_attr_parameters_are_stored_half_and_upcast():
    class PosAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 6, 8))
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(x + self.pos)

    model = PosAdd().eval()
    x = torch.randn(3, 6, 8)
    gm = fxopt.trace(model, (x,))
    result = fp.ConvertFP16()(gm)
    assert gm.pos.dtype == torch.float16 and result.stats["attributes"] == 1
    assert isinstance(gm.norm, FP16Module)
    out = gm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x), atol=5e-3, rtol=5e-3)


def test_transformer_encoder_and_lstm():
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    x = torch.randn(2, 10, 64)
    gm = fxopt.trace(model, (x,))
    assert fp.ConvertFP16()(gm).stats["TransformerEncoderLayer"] == 2
    with torch.inference_mode():
        assert F.cosine_similarity(gm(x), model(x), dim=-1).min() > 0.9999
    lstm = nn.Sequential(nn.LSTM(8, 16)).eval()
    gm = fxopt.trace(lstm)
    fp.ConvertFP16()(gm)
    seq = torch.randn(5, 2, 8)
    with torch.inference_mode():
        assert (gm(seq)[0] - lstm(seq)[0]).abs().max() < 1e-2


def test_nothing_to_convert_is_not_modified():
    gm = fxopt.trace(nn.Sequential(nn.ReLU(), nn.Flatten()))
    result = fp.ConvertFP16()(gm)
    assert result.modified is False
    again = fp.ConvertFP16()(fxopt.trace(nn.Sequential(nn.ReLU())))
    assert again.modified is False


def test_deepcopy_and_errors(resnet18):
    gm = fxopt.trace(resnet18)
    fp.ConvertFP16()(gm)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(copy.deepcopy(gm)(x), gm(x))
    with pytest.raises(ValueError, match="compute"):
        fp.ConvertFP16(compute="bf16")


def test_qnnpack_engine_upcasts_everything():
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(32, 4)).eval()
        x = torch.randn(2, 5, 32)
        gm = fxopt.trace(model, (x,))
        fp.ConvertFP16()(gm)
        assert isinstance(gm.get_submodule("1"), FP16Module)
        assert isinstance(gm.get_submodule("0.layers.0"), FP16Module)
        with torch.inference_mode():
            torch.testing.assert_close(gm(x), model(x), atol=2e-3, rtol=2e-3)
    finally:
        torch.backends.quantized.engine = engine
