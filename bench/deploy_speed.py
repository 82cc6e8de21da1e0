"""Deployment runtimes, int8: fxopt's scales in ONNX Runtime / OpenVINO vs the runtimes' own quantizers.

    python -m bench.deploy_speed                                   # the full matrix (about 10 min, quiet 2-core CPU)
    python -m bench.deploy_speed --models shufflenet --batch 1 --threads 1 --rounds 3   # a quick subset

For every model, one float ONNX export (fxopt, BatchNorm folded) and one calibration set feed all of:

==================  =====================================================================================
``fp32``            PyTorch eager, float (the baseline of every ratio)
``fxopt x86``       fxopt static int8 (``recipes.static_int8(data, bias_correction=True)``; histogram
                    observers) on PyTorch's x86 kernels
``fxopt onnx``      fxopt static int8 → QDQ ONNX with fxopt's calibrated scales, run by ONNX Runtime
``ort quant``       ``onnxruntime.quantization.quantize_static`` on the same float export (QDQ, per-channel,
                    MinMax, U8 activations / S8 weights), run by ONNX Runtime
``fxopt openvino``  fxopt static int8 prepared for OpenVINO (``recipes.static_int8(data, bias_correction=True,
                    backend="openvino")``: attention's matmuls int8 too) → IR (QDQ kept), run by OpenVINO
``nncf openvino``   ``nncf.quantize`` (its defaults: performance preset, fast bias correction) on the same
                    float export converted to OpenVINO, run by OpenVINO
==================  =====================================================================================

Timings are interleaved in one process (``fxopt.benchmark_many``: rotating order, median of all calls)
at each batch size and thread count; every runtime session is built for that thread count. SQNR (dB)
is each int8 model's output vs fp32 eager on held-out inputs. The last two columns are the parity checks of
issue 8: ORT quantize_static's time / fxopt onnx's, NNCF+OpenVINO's time / fxopt openvino's (≥ 1: fxopt is
no slower). The first line printed names the CPU and the load average. The pytest-benchmark suite is
``bench/bench_deploy.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tabulate import tabulate

from bench.quant_reference import data, engine, zoo_model  # noqa: E402

import fxopt  # noqa: E402
from fxopt import recipes  # noqa: E402
from fxopt.backends.onnx import OnnxModule  # noqa: E402
from fxopt.backends.openvino import OpenVinoModule  # noqa: E402

MODELS = ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "efficientnet_b0", "transformer"]
CANDIDATES = ["fp32", "fxopt x86", "fxopt onnx", "ort quant", "fxopt openvino", "nncf openvino"]


class TextEncoder(nn.Module):
    """A 6-layer, 384-wide pre-LN transformer encoder written with nn.Linear + scaled_dot_product_attention
    (traceable, so every projection and FFN matmul is quantized; torch.nn.TransformerEncoder stays a leaf)."""

    def __init__(self, width: int = 384, heads: int = 6, layers: int = 6, ff: int = 1536, vocab_dim: int = 64):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(vocab_dim, width)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(width), "qkv": nn.Linear(width, 3 * width), "proj": nn.Linear(width, width),
                "norm2": nn.LayerNorm(width), "fc1": nn.Linear(width, ff), "fc2": nn.Linear(ff, width),
            }))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 16)

    def forward(self, x):
        h = self.embed(x)
        b, t, w = h.shape
        for blk in self.blocks:
            qkv = blk["qkv"](blk["norm1"](h)).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            h = h + blk["proj"](att.transpose(1, 2).reshape(b, t, w))
            h = h + blk["fc2"](torch.nn.functional.gelu(blk["fc1"](blk["norm2"](h))))
        return self.head(self.norm(h).mean(1))


ALIASES = {"shufflenet_v2": "shufflenet_v2_x1_0", "shufflenet": "shufflenet_v2_x1_0", "encoder": "transformer",
           "efficientnet": "efficientnet_b0", "mobilenet": "mobilenet_v2"}


def build_model(name: str, size: int, n_calib: int = 8):
    """(model, calibration batches, test batches, input maker)"""
    if name == "transformer":
        torch.manual_seed(0)
        model = TextEncoder().eval()
        gen = torch.Generator().manual_seed(1)
        calib = [torch.randn(4, 64, 64, generator=gen) for _ in range(n_calib)]
        test = [torch.randn(4, 64, 64, generator=gen) for _ in range(2)]
        return model, calib, test, lambda b: torch.randn(b, 64, 64)
    model = zoo_model(name, 96)
    calib, test = data(size, n_calib=n_calib, n_test=2, batch=4)
    return model, calib, test, lambda b: torch.randn(b, 3, size, size)


def ort_quantize(float_module: OnnxModule, calib: list[torch.Tensor]) -> bytes:
    """ONNX Runtime's quantize_static on fxopt's float export: QDQ, per-channel, MinMax, U8/S8."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    name = float_module.info["inputs"][0]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: b.numpy()} for b in calib])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(float_module.model_bytes)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return dst.read_bytes()


def nncf_quantize(float_ir: OpenVinoModule, calib: list[torch.Tensor]) -> tuple[bytes, bytes]:
    """nncf.quantize (defaults) on the float IR of the same export; returns the int8 IR (xml, bin)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(model=float_ir.xml.decode(),
                            weights=ov.Tensor(np.frombuffer(float_ir.weights, np.uint8)))
    name = float_ir.info["inputs"][0]
    dataset = nncf.Dataset(calib, lambda b: {name: b.numpy()})
    quantized = nncf.quantize(model, dataset, subset_size=len(calib))  # items are batches: all of them
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "m.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


def sqnr(ref: nn.Module, cand: nn.Module, test: list[torch.Tensor]) -> float:
    with torch.inference_mode(), engine("x86"):
        r = torch.cat([ref(t) for t in test])
        c = torch.cat([cand(t) for t in test])
    return float(10 * torch.log10(r.pow(2).mean() / (r - c).pow(2).mean()))


def prepare(name: str, size: int, observer: str, bias_correction: bool = True, n_calib: int = 8):
    """The float model, test inputs, an input maker, every candidate's artifact and the float IR.

    fxopt's int8 graph is prepared (``recipes.static_int8``, with bias correction unless told not to: NNCF's
    defaults correct biases too) for x86 and lowered to x86 and onnx, and prepared again for openvino, as
    ``fxopt.compile(..., backend="openvino")`` does: there attention's q @ kᵀ and weights @ v are int8 matmuls
    (OpenVINO's fused int8 attention kernel, as in NNCF's IR; the x86 preparation keeps attention float, and
    x86 also caps depthwise weights at ±63 for fbgemm). ORT's quantize_static and NNCF start from fxopt's float
    (BatchNorm-folded) ONNX export and see the same calibration batches."""
    model, calib, test, make = build_model(name, size, n_calib)
    ex = (calib[0][:1],)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxopt.compile(model, recipes.static_int8(calib, observer=observer, bias_correction=bias_correction),
                                 example_inputs=ex)
        prepared_ov = fxopt.compile(model, recipes.static_int8(calib, observer=observer, bias_correction=bias_correction,
                                                               backend="openvino"), example_inputs=ex)
        float_onnx = fxopt.compile(model, recipes.fuse(), example_inputs=ex, backend="onnx")
        float_ir = fxopt.compile(model, recipes.fuse(), example_inputs=ex,
                                 backend=fxopt.backends.OpenVinoBackend(compress_to_fp16=False))
        artifacts = {
            "fxopt x86": fxopt.lower(prepared, "x86"),
            "fxopt onnx": fxopt.lower(prepared, "onnx").model_bytes,
            "ort quant": ort_quantize(float_onnx, calib),
            "fxopt openvino": fxopt.lower(prepared_ov, "openvino"),
        }
        try:
            artifacts["nncf openvino"] = nncf_quantize(float_ir, calib)
        except ImportError:
            print("nncf is not installed: skipping the NNCF column", file=sys.stderr)
    return model, test, make, artifacts, float_ir


def candidates_for(model, artifacts, float_ir, threads: int) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"fp32": model, "fxopt x86": artifacts["fxopt x86"]}
    out["fxopt onnx"] = OnnxModule(artifacts["fxopt onnx"], threads)
    out["ort quant"] = OnnxModule(artifacts["ort quant"], threads)
    ov_mod = artifacts["fxopt openvino"]
    out["fxopt openvino"] = OpenVinoModule(ov_mod.xml, ov_mod.weights, threads)
    if "nncf openvino" in artifacts:
        xml, weights = artifacts["nncf openvino"]
        out["nncf openvino"] = OpenVinoModule(xml, weights, threads)
    return out


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def time_row(cands: dict[str, nn.Module], x: torch.Tensor, threads: int, rounds: int, iters: int,
             lead_in: int = 1) -> dict[str, float]:
    """Median ms per call of every candidate, interleaved (rotating order every round) in this process.

    ``lead_in`` untimed calls start every candidate's turn: the rotation keeps the cyclic order, so ``fxopt onnx``
    always ran right after a PyTorch candidate, whose OpenMP workers spin for a few ms after each call; the
    first ONNX Runtime call after that ran 3x slower at 2 threads on 2 cores, and ``ort quant`` (always after
    ``fxopt onnx``) never paid it (the 0.75 of mobilenet_v2 b1 x2 threads, with ``--lead-in 0``). The lead-in
    call does not absorb all of it (mobilenet_v2 b1 x2 threads still measured 0.74 with it), so the order is
    also shuffled every round: every candidate follows every other about equally often."""
    with engine("x86"):
        cmp = fxopt.benchmark_many(cands, (x,), rounds=rounds, iters=iters, warmup=2, threads=threads,
                                   lead_in=lead_in, shuffle=True)
    return {k: v.median_ms for k, v in cmp.timings.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)} (aliases: {', '.join(ALIASES)})")
    parser.add_argument("--batch", "--batches", dest="batches", default="1,8", help="batch sizes, e.g. 1,8")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, e.g. 1,2")
    parser.add_argument("--size", type=int, default=224, help="image side (CNNs)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per (model, batch, threads)")
    parser.add_argument("--iters", type=int, default=4, help="calls per candidate per round")
    parser.add_argument("--lead-in", default="1",
                        help="untimed calls at the start of every candidate's turn (0: the harness before the fix); "
                             "a list, e.g. 0,1, times every row once per value")
    parser.add_argument("--calib", type=int, default=8, help="calibration batches of 4")
    parser.add_argument("--observer", default="histogram")
    parser.add_argument("--no-bias-correction", action="store_true",
                        help="fxopt without bias correction (NNCF keeps its default fast bias correction)")
    args = parser.parse_args(argv)
    models = [ALIASES.get(m, m) for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {MODELS}")
    print(f"# {_cpu()}; {_load()} at start; torch {torch.__version__}", flush=True)
    speed_rows, sqnr_rows = [], []
    for name in models:
        model, test, make, artifacts, float_ir = prepare(name, args.size, args.observer,
                                                         not args.no_bias_correction, args.calib)
        cands = candidates_for(model, artifacts, float_ir, 1)
        sqnr_rows.append([name] + [f"{sqnr(model, cands[c], test):.1f}" if c in cands else "-"
                                   for c in CANDIDATES[1:]])
        print(sqnr_rows[-1], flush=True)
        for threads in _ints(args.threads):
            cands = candidates_for(model, artifacts, float_ir, threads)
            for batch, lead_in in [(b, k) for b in _ints(args.batches) for k in _ints(args.lead_in)]:
                ms = time_row(cands, make(batch), threads, args.rounds, args.iters, lead_in)
                label = name if len(_ints(args.lead_in)) == 1 else f"{name} (lead-in {lead_in})"
                row = [label, batch, threads, f"{ms['fp32']:.1f}"]
                row += [f"{ms['fp32'] / ms[c]:.2f}x" if c in ms else "-" for c in CANDIDATES[1:]]
                row.append(f"{ms['ort quant'] / ms['fxopt onnx']:.2f}")
                row.append(f"{ms['nncf openvino'] / ms['fxopt openvino']:.2f}" if "nncf openvino" in ms else "-")
                speed_rows.append(row)
                print(row, flush=True)
    print(f"\n# {_cpu()}; {_load()} at the end")
    print(tabulate(speed_rows, headers=["model", "batch", "threads", "fp32 ms"] + CANDIDATES[1:]
                   + ["onnx: ort/fxopt time", "ov: nncf/fxopt time"], tablefmt="github"))
    print()
    print(tabulate(sqnr_rows, headers=["SQNR dB vs fp32"] + CANDIDATES[1:], tablefmt="github"))


if __name__ == "__main__":
    main()
