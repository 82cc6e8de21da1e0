"""Task accuracy kept: a small CNN trained in seconds on scikit-learn's digits, then static int8."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt import recipes
from fxopt.demo import DigitsCNN, accuracy, load_digits_tensors, train


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors(16, seed=0)
    model = train(DigitsCNN(), xtr, ytr, epochs=6, seed=0)
    return model, xtr, xte, yte


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_static_int8_keeps_accuracy_within_one_point(trained, backend):
    model, xtr, xte, yte = trained
    float_acc = accuracy(model, xte, yte)
    assert float_acc > 90.0  # the float model really learned the task
    calib = [xtr[i : i + 32] for i in range(0, 256, 32)]
    q = fxopt.compile(model, recipes.static_int8(calib, backend=backend), example_inputs=(xte[:1],), backend=backend)
    q_acc = accuracy(q, xte, yte)
    assert q_acc >= float_acc - 1.0, f"{backend}: int8 {q_acc:.2f}% vs float {float_acc:.2f}%"
    assert fxopt.report(q).total_bytes <= 0.27 * fxopt.report(model).total_bytes
    # the user's model was not touched
    assert accuracy(model, xte, yte) == float_acc
