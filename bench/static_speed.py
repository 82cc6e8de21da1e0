"""Static int8 latency: float eager vs fxopt int8 vs torch.ao FX int8, measured interleaved in one process.

    python -m bench.static_speed [--models resnet18,...] [--batches 1,8] [--threads 2] [--backend x86]
    python -m bench.static_speed --threads 1 --batches 1,2 --clock cpu   # on a shared, loaded machine
    python -m bench.static_speed --models zoo --threads 1 --batches 1 --clock cpu   # the README's 10 classifiers
    python -m bench.static_speed --models efficientnet_b0 --batches 1 --threads 1 --clock cpu \
        --variant unit=float_unit_maps=True --variant plain=onednn=False   # x86 lowering options, A/B

Also times calibration + conversion for both (same calibration data, same observer kind).
Prints one table of medians and ratios; the pytest-benchmark variant is bench/bench_static.py.
The ratios are *paired*: for every round (wall clock) or every interleaved call (``--clock cpu``) the
candidates ran back to back, so each round gives one ratio ``float / fxopt`` and ``torch.ao / fxopt``
(> 1: fxopt is faster) and the table shows the median ratio with its 25-75 % range.
``--variant NAME=OPTION=VALUE[,OPTION=VALUE]`` (repeatable) adds the same calibrated graph lowered
with ``X86Backend(OPTION=VALUE, ...)`` (``QnnpackBackend`` with ``--backend qnnpack``) as one more interleaved
candidate; its columns are ``NAME / fxopt`` (paired time ratio: < 1 means the variant is faster than fxopt's
defaults), ``torch.ao / NAME`` and ``float / NAME`` (> 1: the variant is faster) and its first call's time,
e.g. ``--variant jit=freeze=True`` (the frozen TorchScript runtime: its first call traces). On a shared machine
the paired median is steadier than the ratio of two medians, since a burst of load hits both.
``--inductor`` adds fxopt's ``x86-inductor`` backend (the same calibration, compiled by TorchInductor; its compile
time is printed) and ``--pt2e`` torchao's own PT2E flow (``X86InductorQuantizer`` + ``torch.compile``, freezing) as
more interleaved candidates; their columns are ``NAME: ms, float / NAME, NAME / fxopt`` (paired ratios: float / NAME
> 1 means NAME is faster than float; NAME / fxopt < 1 means NAME is faster than fxopt's x86 lowering).
``--clock cpu`` (with ``--threads 1``) measures the CPU time of the calling thread instead of wall time:
on a machine shared with other jobs, time spent waiting for a core is not counted.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import statistics
import time

import torch
from tabulate import tabulate

from bench.quant_reference import ZOO, data, engine, fxopt_int8, torchao_int8, zoo_model

import fxopt
from fxopt import recipes

SPEED_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0",
                "regnet_x_400mf"]


def _cpu_samples(candidates: dict, x: torch.Tensor, rounds: int, iters: int) -> dict[str, list[float]]:
    """CPU time (ms) of the calling thread per call, candidates interleaved call by call (single-threaded use):
    sample ``i`` of every candidate comes from the same rotation."""
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
                samples[name].append((time.thread_time() - start) * 1e3)
    return samples


def _cpu_medians(candidates: dict, x: torch.Tensor, rounds: int, iters: int) -> dict[str, float]:
    """Median CPU time (ms) of the calling thread per call, candidates interleaved (single-threaded use)."""
    return {k: statistics.median(v) for k, v in _cpu_samples(candidates, x, rounds, iters).items()}


def paired_ratio(slow: list[float], fast: list[float], group: int = 1) -> tuple[float, float, float]:
    """Median and quartiles of ``slow / fast`` over groups of ``group`` consecutive samples timed side by side
    (the median of each group first): the paired speed-up of ``fast`` over ``slow``."""
    if len(slow) != len(fast) or not slow:
        raise ValueError("paired_ratio needs two equally long, non-empty sample lists")
    ratios = []
    for i in range(0, len(slow), group):
        ratios.append(statistics.median(slow[i:i + group]) / statistics.median(fast[i:i + group]))
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return med, q1, q3


def _fmt(ratio: tuple[float, float, float]) -> str:
    med, q1, q3 = ratio
    return f"{med:.2f}x [{q1:.2f}-{q3:.2f}]"


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=OPTION=VALUE[,OPTION=VALUE...]`` -> ``(NAME, {OPTION: VALUE})``; values are Python literals."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--variant wants NAME=OPTION=VALUE[,OPTION=VALUE], got {text!r}")
    options = {}
    for item in rest.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--variant {name}: {item!r} is not OPTION=VALUE")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"--variant {name}: {value!r} is not a Python literal") from exc
    return name, options


def _variants(model, calib, specs: dict[str, dict], backend: str) -> dict:
    """The model calibrated once and lowered once per variant with ``X86Backend(**options)`` (or qnnpack's)."""
    if not specs:
        return {}
    from fxopt.backends.qnnpack import QnnpackBackend  # noqa: PLC0415 - only with --variant
    from fxopt.backends.x86 import X86Backend  # noqa: PLC0415

    cls = X86Backend if backend == "x86" else QnnpackBackend
    prepared = fxopt.compile(model, recipes.static_int8(calib, backend=backend), example_inputs=(calib[0][:1],))
    return {name: fxopt.lower(prepared, cls(**options)) for name, options in specs.items()}


def _compiled_peers(model, calib, inductor: bool, pt2e: bool) -> dict:
    """fxopt's x86-inductor lowering and torchao's PT2E + X86InductorQuantizer flow, each compiled on one call."""
    peers, x = {}, calib[0][:1]
    if inductor:
        t = time.perf_counter()
        peers["inductor"] = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(x,), backend="x86-inductor")
        with torch.no_grad():
            peers["inductor"](x)
        print(f"  x86-inductor: calibrate + lower + compile {time.perf_counter() - t:.1f} s, "
              f"{peers['inductor'].meta['stats']}", flush=True)
    if pt2e:
        t = time.perf_counter()
        try:
            peers["pt2e"] = torchao_pt2e_int8(model, calib)
            print(f"  torchao PT2E: prepare + calibrate + convert + compile {time.perf_counter() - t:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - a peer that fails on a model is reported, not fatal
            print(f"  torchao PT2E failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
    return peers


def torchao_pt2e_int8(model, calib):
    """torchao's PT2E static int8 for Inductor (reference only): export, X86InductorQuantizer's default config,
    calibrate, convert, ``torch.compile`` with freezing (compiled here, at batch 1, on the first batch's first image)."""
    from torch._inductor import config  # noqa: PLC0415
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: PLC0415
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq  # noqa: PLC0415

    x = calib[0][:1]
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    exported = torch.export.export(copy.deepcopy(model), (x,)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calib:  # one image at a time: the program was exported at batch 1
            for image in batch.split(1):
                prepared(image)
    compiled = torch.compile(convert_pt2e(prepared))

    def run(*args):  # freezing on every call: a recompile (e.g. under inference_mode) must freeze too
        with torch.no_grad(), config.patch(freezing=True):
            return compiled(*args)

    run(x)
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(SPEED_MODELS), help="comma list, or 'zoo' (README's 10)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=OPTION=VALUE[,OPTION=VALUE]: also time fxopt lowered with X86Backend(OPTION=VALUE) "
                             "(QnnpackBackend with --backend qnnpack)")
    parser.add_argument("--inductor", action="store_true", help="also time fxopt's x86-inductor backend")
    parser.add_argument("--pt2e", action="store_true",
                        help="also time torchao's PT2E X86InductorQuantizer flow compiled by Inductor")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
    try:
        variants = dict(parse_variant(v) for v in args.variant)
    except ValueError as exc:
        parser.error(str(exc))
    if variants and args.backend not in ("x86", "qnnpack"):
        parser.error("--variant lowers with X86Backend / QnnpackBackend options: use --backend x86 or qnnpack")
    reserved = {"float", "fxopt", "torch.ao"} & set(variants)
    if reserved:
        parser.error(f"--variant names {sorted(reserved)} are taken by the built-in candidates")
    torch.set_num_threads(args.threads)
    qengine = "x86" if args.backend == "x86" else "qnnpack"
    rows = []
    names = ZOO if args.models == "zoo" else args.models.split(",")
    print(f"load average {os.getloadavg()}, {torch.get_num_threads()} thread(s), clock={args.clock}", flush=True)
    for name in names:
        model = zoo_model(name, 96)
        calib, _ = data(args.size, n_calib=4, n_test=1, batch=4)
        t = time.perf_counter()
        ours = fxopt_int8(model, calib, args.backend)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        ref = torchao_int8(model, calib, args.backend)
        t_ref = time.perf_counter() - t
        extra = _variants(model, calib, variants, args.backend)
        peers = _compiled_peers(model, calib, args.inductor, args.pt2e)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, args.size, args.size)
            iters = 10 if batch == 1 else 3
            candidates = {"float": model, "fxopt": ours, "torch.ao": ref, **extra, **peers}
            first_s = {}  # a variant's first call at this input shape (with freeze=True: trace + freeze + check)
            with engine(qengine), torch.no_grad():
                for v, module in extra.items():
                    t = time.perf_counter()
                    with torch.inference_mode():
                        module(x)
                    first_s[v] = time.perf_counter() - t
                if args.clock == "cpu":
                    samples, group = _cpu_samples(candidates, x, args.rounds, iters), 1
                else:
                    cmp = fxopt.benchmark_many(candidates, (x,), rounds=args.rounds, iters=iters, warmup=3,
                                               threads=args.threads)
                    samples, group = {k: list(v.samples_ms) for k, v in cmp.timings.items()}, iters
            ms = {k: statistics.median(v) for k, v in samples.items()}
            vs_float = paired_ratio(samples["float"], samples["fxopt"], group)
            vs_ao = paired_ratio(samples["torch.ao"], samples["fxopt"], group)
            rows.append([name, batch, f"{ms['float']:.2f}", f"{ms['fxopt']:.2f}", f"{ms['torch.ao']:.2f}",
                         _fmt(vs_float), _fmt(paired_ratio(samples["float"], samples["torch.ao"], group)),
                         _fmt(vs_ao), "SLOWER THAN FLOAT" if vs_float[0] < 1.0 else "",
                         f"{t_ours:.1f}/{t_ref:.1f}"]
                        + [f"{ms[v]:.2f} ms, {_fmt(paired_ratio(samples[v], samples['fxopt'], group))}, "
                           f"{_fmt(paired_ratio(samples['torch.ao'], samples[v], group))}, "
                           f"{_fmt(paired_ratio(samples['float'], samples[v], group))}, first call {first_s[v]:.2f} s"
                           for v in extra]
                        + [f"{ms[p]:.2f} ms, {_fmt(paired_ratio(samples['float'], samples[p], group))}, "
                           f"{_fmt(paired_ratio(samples[p], samples['fxopt'], group))}" for p in peers])
            print(rows[-1], flush=True)
    print(tabulate(rows, headers=["model", "batch", "float ms", "fxopt ms", "torch.ao ms", "float/fxopt (paired)",
                                  "float/torch.ao", "torch.ao/fxopt", "", "calib+convert s (fxopt/ao)"]
                   + [f"{v} ms, {v} / fxopt, torch.ao / {v}, float / {v}, first call" for v in variants]
                   + [f"{p}: ms, float/{p}, {p}/fxopt" for p in ("inductor", "pt2e") if getattr(args, p)]))
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
