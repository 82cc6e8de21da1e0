"""fxopt's OpenVINO int8 IR against NNCF's, layer by layer: what the CPU plugin runs and what it costs.

    python -m bench.openvino_parity                                     # efficientnet_b0, mobilenet_v2, transformer
    python -m bench.openvino_parity --models efficientnet_b0 --batch 1 --threads 1 --rounds 30

The same models, calibration batches and recipes as :mod:`bench.deploy_speed` (fxopt:
``recipes.static_int8(data, bias_correction=True, backend="openvino")`` lowered to ``openvino``; NNCF: ``nncf.quantize`` defaults on
the same float IR). For each model it prints

* the runtime model of both (``compiled_model.get_runtime_model()``): compute layers by type and runtime
  precision, and how many FakeQuantize ops of the IR sit between a conv and the activation after it;
* per inference, interleaved over ``--rounds`` (rotating order): the **CPU time** of the process (one inference
  thread: the work done, which other jobs on a loaded machine do not inflate the way they inflate wall time),
  the wall time, and OpenVINO's own profiling total (``PERF_COUNT``: the sum of every executed layer's
  ``real_time``; "min" sums each layer's fastest round);
* SQNR of each against fp32 eager on held-out inputs.

Ratios are NNCF / fxopt: ≥ 1 means fxopt's IR is no slower.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import Counter, defaultdict

import numpy as np
import torch
from tabulate import tabulate

from bench.deploy_speed import ALIASES, MODELS, _cpu, _ints, _load, build_model, nncf_quantize

import fxopt  # noqa: E402
from fxopt import recipes  # noqa: E402
from fxopt.backends.openvino import OpenVinoBackend  # noqa: E402

_COMPUTE = {"Convolution", "FullyConnected", "Eltwise", "Reduce", "MVN", "Subgraph", "MatMul", "Pooling"}


def build(name: str, size: int, n_calib: int = 8) -> tuple:
    """(float model, test batches, input maker, {candidate: (xml, bin)})"""
    model, calib, test, make = build_model(name, size, n_calib)
    ex = (calib[0][:1],)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxopt.compile(model, recipes.static_int8(calib, bias_correction=True, backend="openvino"),
                                 example_inputs=ex)
        ours = fxopt.lower(prepared, "openvino")
        float_ir = fxopt.compile(model, recipes.fuse(), example_inputs=ex,
                                 backend=OpenVinoBackend(compress_to_fp16=False))
        theirs = nncf_quantize(float_ir, calib)
    return model, test, make, {"fxopt": (ours.xml, ours.weights), "nncf": theirs}


def _read(core, ov, xml: bytes, weights: bytes):
    return core.read_model(model=xml.decode(), weights=ov.Tensor(np.frombuffer(weights, np.uint8)))


def structure(model, compiled) -> dict:
    """Compute layers by (type, runtime precision) and FakeQuantize ops between a conv and its activation."""
    runtime = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in _COMPUTE:
            runtime[f"{kind} {info['runtimePrecision'].astype(str)}"] += 1
    between = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Swish", "Sigmoid", "HSwish", "HSigmoid", "Gelu", "Tanh"):
            src = op.input_value(0).get_node()
            if src.get_type_name() == "FakeQuantize":
                inner = src.input_value(0).get_node()
                if inner.get_type_name() == "Add":
                    inner = inner.input_value(0).get_node()
                between += inner.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")
    fq = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    return {"runtime": runtime, "fq": fq, "fq_before_activation": between}


def measure(irs: dict, x: np.ndarray, threads: int, rounds: int) -> dict:
    import openvino as ov  # noqa: PLC0415

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32"}
    runs = {}
    for name, (xml, weights) in irs.items():
        model = _read(core, ov, xml, weights)
        plain = core.compile_model(model, "CPU", config)
        profiled = core.compile_model(model, "CPU", {**config, "PERF_COUNT": True})
        runs[name] = (plain.create_infer_request(), profiled.create_infer_request(), structure(model, plain))
        for _ in range(2):
            runs[name][0].infer({0: x})
            runs[name][1].infer({0: x})
    cpu, wall, prof, layer = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
    names = list(irs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            plain, profiled, _ = runs[name]
            for _ in range(2):
                c0, t0 = time.process_time(), time.perf_counter()
                plain.infer({0: x})
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
            profiled.infer({0: x})
            total = 0.0
            for info in profiled.profiling_info:
                ms = info.real_time.total_seconds() * 1e3
                total += ms
                layer[name][info.node_name].append(ms)
            prof[name].append(total)
    return {name: {"cpu": statistics.median(cpu[name]), "wall": statistics.median(wall[name]),
                   "prof": statistics.median(prof[name]),
                   "prof_min": sum(min(v) for v in layer[name].values()), "structure": runs[name][2]}
            for name in names}


def sqnr(model, irs: dict, test: list[torch.Tensor]) -> dict[str, float]:
    """Each IR's output vs fp32 eager on the held-out batches (dB)."""
    import openvino as ov  # noqa: PLC0415

    core = ov.Core()
    out = {}
    with torch.inference_mode():
        ref = torch.cat([model(t) for t in test])
    for name, (xml, weights) in irs.items():
        compiled = core.compile_model(_read(core, ov, xml, weights), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = torch.cat([torch.from_numpy(compiled({0: t.numpy()})[0].copy()) for t in test])
        out[name] = float(10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="efficientnet_b0,mobilenet_v2,transformer")
    parser.add_argument("--batch", "--batches", dest="batches", default="1")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    models = [ALIASES.get(m, m) for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {MODELS}")
    torch.set_num_threads(1)
    print(f"# {_cpu()}; {_load()} at start", flush=True)
    rows, shapes = [], []
    for name in models:
        model, test, make, irs = build(name, args.size)
        quality = sqnr(model, irs, test)
        for threads in _ints(args.threads):
            for batch in _ints(args.batches):
                got = measure(irs, make(batch).numpy(), threads, args.rounds)
                f, n = got["fxopt"], got["nncf"]
                rows.append([name, batch, threads, f"{f['cpu']:.2f}", f"{n['cpu']:.2f}", f"{n['cpu'] / f['cpu']:.3f}",
                             f"{n['wall'] / f['wall']:.3f}", f"{f['prof']:.2f}", f"{n['prof']:.2f}",
                             f"{n['prof'] / f['prof']:.3f}", f"{n['prof_min'] / f['prof_min']:.3f}"])
                print(rows[-1], flush=True)
        for cand in ("fxopt", "nncf"):
            s = got[cand]["structure"]
            shapes.append([name, cand, f"{quality[cand]:.1f}", s["fq"], s["fq_before_activation"],
                           ", ".join(f"{k}: {v}" for k, v in sorted(s["runtime"].items()))])
    print(f"\n# {_cpu()}; {_load()} at the end")
    print(tabulate(rows, headers=["model", "batch", "threads", "fxopt cpu ms", "nncf cpu ms", "cpu nncf/fxopt",
                                  "wall nncf/fxopt", "fxopt prof ms", "nncf prof ms", "prof nncf/fxopt",
                                  "prof-min nncf/fxopt"], tablefmt="github"))
    print()
    print(tabulate(shapes, headers=["model", "IR", "SQNR dB vs fp32", "FakeQuantize", "FQ conv→act",
                                    "runtime compute layers (type precision: count)"], tablefmt="github"))


if __name__ == "__main__":
    main()
