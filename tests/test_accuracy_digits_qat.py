"""QAT recovers what 4-bit PTQ loses: a small depthwise-separable CNN on scikit-learn's digits (16x16).

Slow (about a minute on 2 busy cores): ``pytest -m slow -s tests/test_accuracy_digits_qat.py`` prints
the figures the README quotes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import recipes
from fxopt.demo import accuracy, load_digits_tensors, train
from fxopt.quant.nn.qat import freeze_bn


def _cbr(cin, cout, groups=1, k=3):
    return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DepthwiseDigitsCNN(nn.Module):
    """Stem, two depthwise-separable blocks, global pooling, linear head (~4k parameters)."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            *_cbr(1, c), *_cbr(c, c, groups=c), *_cbr(c, 2 * c, k=1), nn.MaxPool2d(2),
            *_cbr(2 * c, 2 * c, groups=2 * c), *_cbr(2 * c, 4 * c, k=1), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(4 * c, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _ptq_with_qat_quantizers(model, calib, example, bits):
    """Post-training: the same fake-quant graph, ranges calibrated, BN frozen, no weight update."""
    q = fxopt.compile(model, recipes.qat(weight_bits=bits), example_inputs=example)
    freeze_bn(q)
    q.train()
    with torch.no_grad():
        for batch in calib:
            q(batch)
    return fxopt.lower(q.eval(), "x86")


def _qat(model, data, example, bits, epochs=3):
    q = fxopt.compile(model, recipes.qat(weight_bits=bits, freeze_bn_after=0,
                                         freeze_observers_after=(epochs - 1) * len(data)), example_inputs=example)
    fxopt.finetune(q, data, epochs=epochs, teacher=model, temperature=4.0, alpha=0.5, lr=1e-4, seed=0)
    return fxopt.lower(q, "x86")


@pytest.mark.slow
def test_four_bit_qat_with_distillation_recovers_what_ptq_loses():
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors(16, seed=0)
    model = train(DepthwiseDigitsCNN(), xtr, ytr, epochs=10, lr=5e-3, seed=0)
    example = (xte[:1],)
    calib = [xtr[i : i + 32] for i in range(0, 256, 32)]
    data = [(xtr[i : i + 64], ytr[i : i + 64]) for i in range(0, len(xtr), 64)]

    float_acc = accuracy(model, xte, yte)
    ptq4 = accuracy(_ptq_with_qat_quantizers(model, calib, example, 4), xte, yte)
    qat4 = accuracy(_qat(model, data, example, 4), xte, yte)
    ptq8 = accuracy(fxopt.compile(model, recipes.static_int8(calib), example_inputs=example, backend="x86"), xte, yte)
    qat8 = accuracy(_qat(model, data, example, 8), xte, yte)
    print(f"\ndigits (x86, test accuracy %): float {float_acc:.2f} | 4-bit weights: PTQ {ptq4:.2f}, QAT+KD {qat4:.2f} "
          f"| int8: PTQ {ptq8:.2f}, QAT+KD {qat8:.2f}")
    assert float_acc > 94.0
    assert ptq4 <= float_acc - 2.0  # 4-bit PTQ loses clearly measurable accuracy
    assert qat4 >= float_acc - 1.0  # QAT with distillation recovers to within one point
    assert qat8 >= ptq8
