"""QAT on torchvision models (random init): prepare -> a few training steps -> lower, x86 and qnnpack.

The lowered int8 model must reproduce the QAT model's eval outputs (SQNR >= 30 dB). Random networks are
poor stand-ins for trained ones in one respect: channels that are nearly dead at init get a BatchNorm
gain of 1/sqrt(running_var) ~ 200, which turns a one-step rounding difference (an int8 kernel rounding a
tie the other way) into a large output difference. The fixture gives BatchNorm statistics from a few
batches and floors ``running_var`` at 0.01 (what training would do to such channels) before QAT.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxopt
from fxopt import recipes
from fxopt.compare import sqnr_db
from fxopt.quant.nn.qat import QATConv

PX = 64


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average over the warm-up batches
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, PX, PX))
    for bn in bns:
        bn.momentum = 0.1
        bn.running_var.clamp_(min=0.01)
    return model.eval()


def _qat_then_lower(name: str, backend: str):
    model = _model(name)
    example = (torch.randn(1, 3, PX, PX),)
    qat = fxopt.compile(model, recipes.qat(backend=backend, freeze_bn_after=1), example_inputs=example)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, PX, PX, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(3)]
    before = qat.get_submodule("fc" if name == "resnet18" else "classifier.1").linear.weight.detach().clone()
    fxopt.finetune(qat, data, steps=3, teacher=model, progress=False)
    assert not torch.equal(before, qat.get_submodule("fc" if name == "resnet18" else "classifier.1").linear.weight)
    assert all(m.bn_frozen for m in qat.modules() if isinstance(m, QATConv) and m.bn is not None)
    lowered = fxopt.lower(qat, backend, check=True)  # and within 3 steps of the reference simulation, layer by layer
    x = torch.randn(8, 3, PX, PX, generator=g)
    with torch.no_grad():
        return model, qat, lowered, sqnr_db(qat(x), lowered(x))


def test_resnet18_x86_lowered_matches_qat():
    model, qat, lowered, sqnr = _qat_then_lower("resnet18", "x86")
    assert sqnr >= 30.0, f"lowered vs QAT eval: {sqnr:.1f} dB"
    assert fxopt.report(lowered).total_bytes < 0.27 * fxopt.report(model).total_bytes


@pytest.mark.slow
@pytest.mark.parametrize("name,backend", [("resnet18", "qnnpack"), ("mobilenet_v2", "x86"),
                                          ("mobilenet_v2", "qnnpack")])
def test_torchvision_lowered_matches_qat(name, backend):
    _, _, _, sqnr = _qat_then_lower(name, backend)
    assert sqnr >= 30.0, f"{name} on {backend}: lowered vs QAT eval {sqnr:.1f} dB"
