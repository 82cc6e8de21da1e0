"""Static int8 latency: float eager vs fxopt int8 vs torch.ao FX int8, measured interleaved in one process.

    python -m bench.static_speed [--models resnet18,...] [--batches 1,8] [--threads 2] [--backend x86]
    python -m bench.static_speed --threads 1 --batches 1,2 --clock cpu   # on a shared, loaded machine

Also times calibration + conversion for both (same calibration data, same observer kind).
Prints one table of medians and ratios; the pytest-benchmark variant is bench/bench_static.py.
``--clock cpu`` (with ``--threads 1``) measures the CPU time of the calling thread instead of wall time:
on a machine shared with other jobs, time spent waiting for a core is not counted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

from bench.quant_reference import data, engine, fxopt_int8, torchao_int8, zoo_model

import fxopt

SPEED_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0",
                "regnet_x_400mf"]


def _cpu_medians(candidates: dict, x: torch.Tensor, rounds: int, iters: int) -> dict[str, float]:
    """Median CPU time (ms) of the calling thread per call, candidates interleaved (single-threaded use)."""
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    with torch.inference_mode():
        for module in candidates.values():
            for _ in range(3):
                module(x)
        for r in range(rounds * iters):
            names = list(candidates)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                start = time.thread_time()
                candidates[name](x)
                samples[name].append(time.thread_time() - start)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(SPEED_MODELS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
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
                if args.clock == "cpu":
                    ms = _cpu_medians({"float": model, "fxopt": ours, "torch.ao": ref}, x, args.rounds, iters)
                else:
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
