"""fxopt PruneChannels vs Torch-Pruning (DepGraph, MetaPruner) on the torchvision zoo, in one run.

    .venv/bin/python -m bench.prune_vs_torch_pruning [--size 224] [--rounds 15] [--models resnet18,...]

Same settings for both: ratio 0.3 per group, L1 magnitude importance, first conv and classifier kept.
Prints parameters, FLOPs and batch-1 latency (median and min over interleaved rounds: float, Torch-Pruning and
fxopt are timed one after the other in every round, in a rotating order, single-threaded; also the median of
the thread's CPU time, which a loaded machine distorts less), the fxopt/Torch-Pruning ratios, the class fxopt
returns (the user's own eager class: ``compile`` swaps the pruned layers into a copy of the model), the CPU-time
ratios of both pruned models run as ``torch.fx`` GraphModules (Torch-Pruning's traced with ``symbolic_trace``,
fxopt's ``graph_form``: what ``compile`` returned before), and
for every layer Torch-Pruning shrank but fxopt did not, fxopt's reason.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

from bench.compress_models import prune_both
from fxopt.compress.eager import graph_form

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_x_400mf", "densenet121"]


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def interleaved_ms(models: list[torch.nn.Module], x: torch.Tensor, rounds: int) -> list[tuple[float, float, float]]:
    """(median, min, median thread-CPU) milliseconds per model, timed one after the other in every round.

    The thread's CPU time (``time.thread_time``; single-threaded runs compute on the calling thread) does not count
    the time other processes hold the core, so its ratios stay meaningful on a loaded machine."""
    times: list[list[float]] = [[] for _ in models]
    cpu: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            for _ in range(3):
                m(x)
        for r in range(rounds):
            for k in range(len(models)):  # the order rotates every round: no model always runs first
                i = (k + r) % len(models)
                start, start_cpu = time.perf_counter(), time.thread_time()
                models[i](x)
                cpu[i].append((time.thread_time() - start_cpu) * 1e3)
                times[i].append((time.perf_counter() - start) * 1e3)
    return [(statistics.median(t), min(t), statistics.median(c)) for t, c in zip(times, cpu)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, reasons = [], []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.randn(1, 3, args.size, args.size)
        tp_model, fx_model, missed = prune_both(model, x, 0.3)
        params = [sum(p.numel() for p in m.parameters()) for m in (model, tp_model, fx_model)]
        fl = [flops(m, x) for m in (model, tp_model, fx_model)]
        # the cause of the gap the eager return closes: the same pruned models run as torch.fx GraphModules
        graphs = [torch.fx.symbolic_trace(tp_model), graph_form(fx_model) or fx_model]
        ms = interleaved_ms([model, tp_model, fx_model, *graphs], x, args.rounds)
        rows.append([name, f"{params[0] / 1e6:.2f}M", f"{params[1] / 1e6:.2f}M", f"{params[2] / 1e6:.2f}M",
                     f"{params[2] / params[1]:.3f}", f"{fl[1] / fl[0]:.3f}", f"{fl[2] / fl[0]:.3f}",
                     f"{ms[0][0]:.1f}", f"{ms[1][0]:.1f}", f"{ms[2][0]:.1f}", f"{ms[2][0] / ms[1][0]:.3f}",
                     f"{ms[2][1] / ms[1][1]:.3f}", f"{ms[2][2] / ms[1][2]:.3f}", type(fx_model).__name__,
                     f"{ms[3][2] / ms[1][2]:.3f}", f"{ms[4][2] / ms[1][2]:.3f}"])
        reasons += [[name, layer, why] for layer, why in missed.items()]
        print(rows[-1], flush=True)
    print(f"\nbatch 1, {args.size}x{args.size}, 1 thread, median (and min) of {args.rounds} interleaved rounds")
    print(tabulate(rows, headers=["model", "params", "TP params", "fxopt params", "fxopt/TP params",
                                  "TP FLOPs", "fxopt FLOPs", "float ms", "TP ms", "fxopt ms", "fxopt/TP ms",
                                  "fxopt/TP min ms", "fxopt/TP cpu ms", "fxopt returns", "TP as fx graph/TP cpu",
                                  "fxopt as fx graph/TP cpu"],
                   disable_numparse=True, tablefmt="github"))
    print("\nlayers Torch-Pruning shrank and fxopt left alone:", "none" if not reasons else "")
    for r in reasons:
        print("  ", *r)


if __name__ == "__main__":
    main()
