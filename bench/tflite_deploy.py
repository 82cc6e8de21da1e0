"""backend="tflite" figures for the README: digits accuracy, SQNR, file size and LiteRT latency vs fp32 eager.

    .venv/bin/python bench/tflite_deploy.py [--models mobilenet_v2,resnet18] [--size 224] [--rounds 10] [--threads N]
    .venv/bin/python bench/tflite_deploy.py --models shufflenet_v2_x1_0,efficientnet_b0,regnet_x_400mf,kws \
        --skip-digits --prepare tflite --threads 1

* digits: the CNN trained in seconds on scikit-learn's digits; float vs the full-int8 ``.tflite`` (float I/O
  and int8 I/O) in the LiteRT interpreter;
* torchvision models (weights=None, BatchNorm statistics made plausible as in the tests; or ``kws``: the Conv1d
  keyword spotter of tests/backends/test_tflite_ops.py on 40 MFCCs x 49 frames): prepared once with
  ``recipes.static_int8`` (x86), then lowered to ``x86`` (fxopt's own int8), ``reference`` (the float
  simulation) and ``tflite``; SQNR of the ``.tflite`` outputs against each on held-out random inputs; file size
  against the fp32 weights; latency at batch 1 of fp32 eager, fxopt x86 int8 and the ``.tflite`` in LiteRT,
  timed interleaved in one process (``fxopt.benchmark_many``) on ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
import torchvision

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT / "tests" / "backends"), str(_ROOT)]

import fxopt  # noqa: E402
from fxopt import backends, recipes  # noqa: E402
from fxopt.backends.tflite import TFLiteBackend  # noqa: E402
from test_onnx import sqnr, trained_looking  # noqa: E402


def digits() -> None:
    from fxopt.demo import DigitsCNN, accuracy, load_digits_tensors, train

    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors(16, seed=0)
    model = train(DigitsCNN(), xtr, ytr, epochs=6, seed=0)
    calib = [xtr[i: i + 32] for i in range(0, 256, 32)]
    prepared = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(xte[:1],))
    tfl = fxopt.lower(prepared, "tflite")
    tfl_io = fxopt.lower(prepared, TFLiteBackend(int8_io=True))
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    print(f"digits CNN: float {accuracy(model, xte, yte):.2f}%  tflite int8 {accuracy(tfl, xte, yte):.2f}%  "
          f"tflite int8 I/O {accuracy(tfl_io, xte, yte):.2f}%  file {len(tfl.model_bytes):,} B "
          f"({len(tfl.model_bytes) / float_bytes:.2f}x fp32 weights)")


def build(name: str, size: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A torchvision classifier (random weights, plausible BatchNorm statistics) at ``size`` px, or ``kws``: the
    Conv1d keyword spotter of the tests on 40 MFCCs x 49 frames."""
    if name == "kws":
        from test_tflite_ops import KeywordSpotter  # noqa: PLC0415

        class Logits(KeywordSpotter):
            def forward(self, x):
                return super().forward(x)[0]

        return Logits().eval(), (1, 40, 49)
    return trained_looking(getattr(torchvision.models, name)(weights=None, num_classes=1000)), (1, 3, size, size)


def zoo(name: str, size: int, rounds: int, prepare: str = "x86") -> None:
    """``prepare="x86"``: one x86-prepared graph lowered to x86, reference and tflite (the same int8 model, up to
    TFLite's weight range). ``prepare="tflite"`` (graphs with ops x86 keeps float, e.g. shufflenet's mean): the
    tflite file from a tflite-prepared graph vs its reference simulation; x86 int8 from its own x86 preparation
    (same calibration data, x86's own grids and float islands)."""
    torch.manual_seed(0)
    model, shape = build(name, size)
    x = torch.randn(shape)
    calib = [torch.randn(shape) for _ in range(8)]
    x86_prepared = fxopt.compile(model, recipes.static_int8(calib), example_inputs=(x,))
    prepared = x86_prepared if prepare == "x86" else \
        fxopt.compile(model, recipes.static_int8(calib, backend="tflite"), example_inputs=(x,))
    x86, ref = fxopt.lower(x86_prepared, "x86"), fxopt.lower(prepared, "reference")
    tfl = fxopt.lower(prepared, "tflite")
    tfl_io = fxopt.lower(prepared, TFLiteBackend(int8_io=True))
    report = backends.get("edgetpu").check(tfl_io)
    test = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f, q, r, t = model(test), x86(test), ref(test), tfl(test)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    size = "x".join(map(str, shape[2:]))
    print(f"{name} {size} (prepared for {prepare}): SQNR tflite vs its reference {sqnr(r, t):.1f} dB, vs fxopt x86 "
          f"int8 {sqnr(q, t):.1f} dB, vs float {sqnr(f, t):.1f} dB (x86 int8 vs float {sqnr(f, q):.1f} dB); file "
          f"{len(tfl.model_bytes):,} B = {len(tfl.model_bytes) / float_bytes:.3f}x fp32 weights ({float_bytes:,} B); "
          f"ops {tfl.meta['ops']}; EdgeTPU check (int8 I/O): {'ok' if report.ok else report}; of the prepared "
          f"graph: {'ok' if backends.get('edgetpu').check(prepared).ok else backends.get('edgetpu').check(prepared)}")
    if prepare == "x86":
        own = fxopt.compile(model, recipes.static_int8(calib, backend="tflite"), example_inputs=(x,))
        with torch.no_grad():
            own_sqnr = sqnr(fxopt.lower(own, "reference")(test), fxopt.lower(own, "tflite")(test))
        print(f"{name} {size} prepared for tflite (weights in [-127, 127] everywhere): SQNR tflite vs its reference "
              f"simulation {own_sqnr:.1f} dB")
    if rounds:
        result = fxopt.benchmark_many({"fp32 eager": model, "fxopt x86 int8": x86, "tflite int8 (LiteRT)": tfl,
                                       "tflite int8 I/O": tfl_io}, (x,), rounds=rounds, iters=5, warmup=3)
        print(result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--prepare", default="x86", choices=["x86", "tflite"],
                        help="the preparation the .tflite is written from (x86 keeps e.g. mean float)")
    parser.add_argument("--threads", type=int, default=None, help="torch and LiteRT threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()}")
    if not args.skip_digits:
        digits()
    for name in args.models.split(","):
        zoo(name, args.size, args.rounds, args.prepare)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
