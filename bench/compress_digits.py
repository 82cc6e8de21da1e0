"""Compression on the digits CNN: accuracy, bytes, gzip bytes, batch-1 latency for each recipe.

    .venv/bin/python -m bench.compress_digits

Trains the demo's DigitsCNN (seconds), applies each compression with a short fine-tune (2 epochs of
``fxopt.finetune``; the variants come from bench/compress_models.py), and prints one table.
Single-threaded, so numbers are comparable on a busy machine.
"""

from __future__ import annotations

import torch
from tabulate import tabulate

import fxopt
from bench.compress_models import digits_variants
from fxopt.demo import accuracy


def main() -> None:
    torch.set_num_threads(1)
    variants, (_, _, xte, yte) = digits_variants()
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
