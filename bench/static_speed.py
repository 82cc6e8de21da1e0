"""Static int8 latency: float eager vs fxopt int8 vs torch.ao FX int8, measured interleaved in one process.

    python -m bench.static_speed [--models resnet18,...] [--batches 1,8] [--threads 2] [--backend x86]

Also times calibration + conversion for both (same calibration data, same observer kind).
Prints one table of medians and ratios; the pytest-benchmark variant is bench/bench_static.py.
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

from bench.quant_reference import data, engine, fxopt_int8, torchao_int8, zoo_model

import fxopt

SPEED_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(SPEED_MODELS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    qengine = "x86" if args.backend == "x86" else "qnnpack"
    rows = []
    for name in args.models.split(","):
        model = zoo_model(name, 96)
        calib, _ = data(args.size, n_calib=4, n_test=1, batch=4)
        t = time.perf_counter()
        ours = fxopt_int8(model, calib, args.backend)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        ref = torchao_int8(model, calib, args.backend)
        t_ref = time.perf_counter() - t
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, args.size, args.size)
            iters = 10 if batch == 1 else 3
            with engine(qengine):
                cmp = fxopt.benchmark_many({"float": model, "fxopt": ours, "torch.ao": ref}, (x,),
                                           rounds=args.rounds, iters=iters, warmup=3, threads=args.threads)
            ms = {k: v.median_ms for k, v in cmp.timings.items()}
            rows.append([name, batch, f"{ms['float']:.2f}", f"{ms['fxopt']:.2f}", f"{ms['torch.ao']:.2f}",
                         f"{ms['float'] / ms['fxopt']:.2f}x", f"{ms['float'] / ms['torch.ao']:.2f}x",
                         f"{ms['torch.ao'] / ms['fxopt']:.2f}", f"{t_ours:.1f}/{t_ref:.1f}"])
            print(rows[-1], flush=True)
    print(tabulate(rows, headers=["model", "batch", "float ms", "fxopt ms", "torch.ao ms", "fxopt speed-up",
                                  "torch.ao speed-up", "ao/fxopt", "calib+convert s (fxopt/ao)"]))


if __name__ == "__main__":
    main()
