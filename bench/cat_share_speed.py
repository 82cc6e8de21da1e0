"""x86 int8 latency with and without shared ``cat`` qparams (``static_int8(share_cat=...)``) beside torch.ao FX.

    python -m bench.cat_share_speed [--models squeezenet1_1,googlenet,densenet121] [--rounds 3]

Batch 1, 224 px, 1 thread, CPU time of the calling thread (``time.thread_time``), the three candidates
interleaved call by call (bench/static_speed.py's timing), ratios paired per call: median [25-75 %].
``separate / shared`` > 1: sharing is faster. Also prints how many cats share their inputs' qparams.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import fxopt
from bench.quant_reference import data, engine, fxopt_int8, torchao_int8, zoo_model
from bench.static_speed import _cpu_samples, _fmt, paired_ratio


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="squeezenet1_1,googlenet,densenet121")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()}", flush=True)
    for name in args.models.split(","):
        model = zoo_model(name, 96)
        calib, _ = data(224, n_calib=4, n_test=1, batch=4)
        shared = fxopt_int8(model, calib, "x86", share_cat=True)
        tied = next(r for r in fxopt.records(shared) if r.name.startswith("calibrate")).stats
        candidates = {"separate": fxopt_int8(model, calib, "x86", share_cat=False), "shared": shared,
                      "torch.ao": torchao_int8(model, calib, "x86")}
        with engine("x86"):
            samples = _cpu_samples(candidates, torch.randn(1, 3, 224, 224), args.rounds, 10)
        medians = " ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in samples.items())
        print(f"{name}: {tied.get('cats_sharing_qparams', 0)} cats share; {medians}; separate/shared "
              f"{_fmt(paired_ratio(samples['separate'], samples['shared']))}, torch.ao/shared "
              f"{_fmt(paired_ratio(samples['torch.ao'], samples['shared']))}", flush=True)
    print(f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
