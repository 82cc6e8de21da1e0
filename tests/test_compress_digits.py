"""Compression keeps task accuracy: the digits CNN, each compression with a short fine-tune, within one
point of float (prune 50%, channels 30%, 16 clusters, low-rank at half the parameters, prune 50% + int8)."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.demo import accuracy

from bench.compress_models import digits_variants

# trains the float model and fine-tunes 6 compressed copies (~30 s of CPU): run with -m slow
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def variants():
    torch.set_num_threads(1)
    found, (_, _, xte, yte) = digits_variants()
    return dict(found), xte, yte


@pytest.mark.parametrize("name", ["prune 50%", "prune 80% gradual", "channels 30%", "cluster 16",
                                  "low-rank 50% params", "spatial SVD 50% params", "prune 50% + int8"])
def test_within_one_point_of_float(variants, name):
    found, xte, yte = variants
    base = accuracy(found["float"], xte, yte)
    assert base > 90.0
    acc = accuracy(found[name], xte, yte)
    assert acc >= base - 1.0, f"{name}: {acc:.2f}% vs float {base:.2f}%"


def test_sizes_shrink_as_each_compression_promises(variants):
    found, _, _ = variants
    rep = {name: fxopt.report(m) for name, m in found.items()}
    float_params = rep["float"].total_params
    assert rep["prune 50%"].sparsity > 0.45 and rep["prune 50%"].compressed_bytes < 0.7 * rep["float"].compressed_bytes
    assert rep["prune 80% gradual"].sparsity > 0.78  # the schedule reached its final sparsity
    assert rep["channels 30%"].total_params < 0.6 * float_params
    assert max(r["unique"] for r in rep["cluster 16"].rows if r["op"] in ("Conv2d", "Linear")) <= 16
    assert rep["cluster 16"].compressed_bytes < 0.25 * rep["float"].compressed_bytes
    assert rep["low-rank 50% params"].total_params < 0.55 * float_params
    assert rep["spatial SVD 50% params"].total_params < 0.55 * float_params
    # combinations with int8 multiply: int8 alone is ~1/4 of float; pruning/clustering/low rank come on top
    int8 = rep["int8 (x86)"]
    assert rep["prune 50% + int8"].compressed_bytes < 0.8 * int8.compressed_bytes
    assert rep["cluster 16 + int8"].compressed_bytes < 0.7 * int8.compressed_bytes
    assert rep["low-rank 50% + int8"].total_bytes < 0.6 * int8.total_bytes
