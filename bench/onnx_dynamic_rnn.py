"""backend="onnx" for dynamic int8 LSTM / GRU: a GE2E-style speaker encoder, fxopt's dynamic int8 in PyTorch vs
its ONNX export in ONNX Runtime (and ORT's own ``quantize_dynamic`` of the float export as the reference).

    .venv/bin/python bench/onnx_dynamic_rnn.py [--rnn lstm|gru] [--hidden 256] [--layers 3] [--frames 160]
                                               [--rounds 15] [--threads 1] [--unrolled]

Outputs: cosine (min over the batch) of each candidate against fxopt's own dynamic int8 and against float; CPU time
of the calling thread per call at batch 1 (``--threads 1``: every runtime computes in the calling thread),
candidates interleaved, medians of ``--rounds`` rounds of 5 calls. ``--unrolled`` adds the unrolled export
(DynamicQuantizeLinear -> MatMulInteger per step) for an LSTM, which the onnx backend uses for GRUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt import recipes
from fxopt.backends.onnx import OnnxModule, export_onnx, onnx_spec


class SpeakerEncoder(nn.Module):
    """GE2E (Wan et al. 2018): 40 mel channels, 3 LSTM layers of 256 (768 in the paper with projection), the
    last frame projected to 256 and L2-normalized."""

    def __init__(self, rnn: str, hidden: int, layers: int) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if rnn == "lstm" else nn.GRU)(40, hidden, layers, batch_first=True)
        self.proj = nn.Linear(hidden, 256)

    def forward(self, mels):
        out, _ = self.rnn(mels)
        return F.normalize(torch.relu(self.proj(out[:, -1])), dim=1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).min())


def ort_quantize_dynamic(model: nn.Module, x: torch.Tensor, threads: int) -> OnnxModule:
    """ONNX Runtime's own dynamic quantization (per-channel int8 weights) of fxopt's float export."""
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    float_gm = fxopt.compile(model, [], example_inputs=(x,))
    proto, _ = export_onnx(float_gm)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(proto, src)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        return OnnxModule(dst.read_bytes(), threads)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rnn", default="lstm", choices=["lstm", "gru"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--frames", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unrolled", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu}; threads {args.threads}; load average {os.getloadavg()}")
    torch.manual_seed(0)
    model = SpeakerEncoder(args.rnn, args.hidden, args.layers).eval()
    x = torch.randn(1, args.frames, 40)
    dyn = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=(x,))
    t0 = time.perf_counter()
    ours = fxopt.lower(dyn, fxopt.backends.OnnxBackend(threads=args.threads))
    print(f"fxopt onnx export: {time.perf_counter() - t0:.1f} s, {len(ours.model_bytes):,} B")
    candidates = {"fp32 eager": model, "fxopt dynamic int8 (torch)": dyn, "fxopt onnx (ORT)": ours}
    if args.unrolled and args.rnn == "lstm":
        spec = dataclasses.replace(onnx_spec(), name="onnx-unrolled")  # not "onnx": the unrolled LSTM form
        proto, _ = export_onnx(dyn, spec)
        candidates["fxopt onnx unrolled (ORT)"] = OnnxModule(proto.SerializeToString(), args.threads)
    candidates["ORT quantize_dynamic (ORT)"] = ort_quantize_dynamic(model, x, args.threads)
    test = torch.randn(4, args.frames, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, mine = model(test), dyn(test)
        for name, module in candidates.items():
            out = module(test)
            print(f"{name}: cosine vs fxopt dynamic int8 {cosine(mine, out):.6f}, vs float {cosine(ref, out):.6f}")
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for module in candidates.values():
            for _ in range(3):
                module(x)
        for _ in range(args.rounds):
            for name, module in candidates.items():
                t = time.thread_time()
                for _ in range(5):
                    module(x)
                times[name].append((time.thread_time() - t) / 5 * 1e3)
    base = float(np.median(times["fp32 eager"]))
    for name, values in times.items():
        med = float(np.median(values))
        print(f"{name}: {med:.2f} ms CPU time per call (batch 1), {base / med:.2f}x fp32 eager")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
