"""Compression on the digits CNN: accuracy, bytes, gzip bytes, batch-1 latency for each recipe.

    .venv/bin/python bench/compress_digits.py

Trains the demo's DigitsCNN (seconds), applies each compression with a short fine-tune (2 epochs, the
loop in tests/compress_util.py), and prints one table. Single-threaded, so numbers are comparable on a
busy machine.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fxopt  # noqa: E402
from fxopt import passes as fp, recipes  # noqa: E402
from fxopt.demo import DigitsCNN, accuracy, load_digits_tensors, train  # noqa: E402
from compress_util import finetune  # noqa: E402


def build(epochs: int = 6, finetune_epochs: int = 2):
    """``[(name, module)]``: the float model and every compressed variant (fine-tuned)."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors(16, seed=0)
    model = train(DigitsCNN(), xtr, ytr, epochs=epochs, seed=0)
    example = (xte[:1],)
    calib = [xtr[i : i + 32] for i in range(0, 256, 32)]

    def tuned(passes):
        gm = fxopt.compile(model, passes, example_inputs=example)
        return finetune(gm, xtr, ytr, epochs=finetune_epochs)

    pruned = tuned(recipes.prune(0.5))
    channels = tuned(recipes.prune(0.3, structured=True))
    clustered = tuned(recipes.cluster(16))
    # the 1-channel first conv and the 10-way classifier hold 1% of the weights: factorizing them only hurts
    low = tuned([fp.LowRankFactorize(rank_ratio=0.5, exclude=("features.0", "classifier"))])
    variants = [
        ("float", model),
        ("int8 (x86)", fxopt.compile(model, recipes.static_int8(calib), example_inputs=example, backend="x86")),
        ("prune 50%", fxopt.compile(pruned, [fp.ApplyMasks()], example_inputs=example)),
        ("channels 30%", channels),
        ("cluster 16", fxopt.compile(clustered, [fp.ApplyMasks()], example_inputs=example)),
        ("low-rank 50% params", low),
    ]
    for name, base in (("prune 50% + int8", pruned), ("cluster 16 + int8", clustered),
                       ("low-rank 50% + int8", low), ("channels 30% + int8", channels)):
        variants.append((name, fxopt.compile(copy.deepcopy(base), [fp.ApplyMasks()] + recipes.static_int8(calib),
                                             example_inputs=example, backend="x86")))
    return variants, (xtr, ytr, xte, yte)


def main() -> None:
    torch.set_num_threads(1)
    variants, (_, _, xte, yte) = build()
    x1 = xte[:1]
    rows = []
    base_acc = accuracy(variants[0][1], xte, yte)
    for name, module in variants:
        rep = fxopt.report(module)
        timing = fxopt.benchmark(module, (x1,), warmup=20, iters=200)
        acc = accuracy(module, xte, yte)
        rows.append([name, f"{acc:.2f}", f"{acc - base_acc:+.2f}", f"{rep.total_params:,}", f"{rep.sparsity:.0%}",
                     f"{rep.total_bytes:,}", f"{rep.compressed_bytes:,}", f"{timing.median_ms:.3f}"])
    print(tabulate(rows, headers=["variant", "acc %", "vs float", "params", "zeros", "bytes", "gzip bytes",
                                  "latency b1 ms"], disable_numparse=True))


if __name__ == "__main__":
    main()
