"""Static int8 SQNR vs float: fxopt against torch.ao FX on the torchvision zoo, both engines.

    python -m bench.quant_numerics [--size 96] [--models resnet18,mobilenet_v2]

Prints one table; the same comparison runs as a (slow) test in tests/quant/test_zoo_numerics.py.
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

from bench.quant_reference import ZOO, data, fxopt_int8, sqnr, torchao_int8, zoo_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--backends", default="x86,qnnpack")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.models.split(","):
        model = zoo_model(name, args.size)
        calib, test = data(args.size)
        row = [name]
        for backend in args.backends.split(","):
            t = time.perf_counter()
            ours = sqnr(model, fxopt_int8(model, calib, backend), test, backend)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            ref = sqnr(model, torchao_int8(model, calib, backend), test, backend)
            t_ref = time.perf_counter() - t
            row += [f"{ours:.2f}", f"{ref:.2f}", f"{ours - ref:+.2f}", f"{t_ours:.1f}/{t_ref:.1f}"]
        rows.append(row)
        print(rows[-1], flush=True)
    headers = ["model"]
    for backend in args.backends.split(","):
        headers += [f"fxopt {backend} dB", f"torch.ao {backend} dB", "Δ dB", "time s (ours/ao)"]
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
