"""Speed/numerics sanity check (not a test): fxopt's int8 lowering vs torch.ao FX on the same model.

    python bench/int8_vs_torchao.py [model] [size] [iters]

Batch 1, 2 threads, the two models timed interleaved; prints the median latency ratio fxopt / torch.ao
(< 1 means fxopt is faster) and both SQNRs vs float. torch.ao.quantization is used here only as the
reference.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings

import torch
import torchvision

import fxopt
from fxopt import backends
from fxopt import passes as fp

warnings.filterwarnings("ignore")


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def main(name: str = "resnet18", size: int = 224, iters: int = 50) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = getattr(torchvision.models, name)(weights=None)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    model.eval()
    calib = [torch.randn(4, 3, size, size) for _ in range(4)]
    x = torch.randn(1, 3, size, size)

    t0 = time.perf_counter()
    gm = fxopt.trace(copy.deepcopy(model), (x,))
    for p in (fp.FoldBatchNorm(), fp.FuseActivations(), fp.InsertQuantStubs(backend="x86"), fp.PlaceObservers(),
              fp.Calibrate(calib)):
        gm = p(gm).graph_module
    t1 = time.perf_counter()
    ours = backends.get("x86").lower(gm)
    t2 = time.perf_counter()

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    t3 = time.perf_counter()
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():
        for c in calib:
            prepared(c)
    t4 = time.perf_counter()
    ref = convert_fx(prepared)
    t5 = time.perf_counter()

    test = torch.randn(4, 3, size, size)
    with torch.no_grad():
        f = model(test)
        print(f"{name} {size}x{size}: SQNR fxopt {sqnr(f, ours(test)):.2f} dB, torch.ao {sqnr(f, ref(test)):.2f} dB")
    print(f"prepare+calibrate: fxopt {t1 - t0:.2f}s torch.ao {t4 - t3:.2f}s; convert: fxopt {t2 - t1:.2f}s "
          f"torch.ao {t5 - t4:.2f}s")

    times: dict[str, list[float]] = {"fxopt": [], "torch.ao": [], "float": []}
    with torch.inference_mode():
        for _ in range(5):
            ours(x), ref(x), model(x)
        for _ in range(iters):
            for key, m in (("fxopt", ours), ("torch.ao", ref), ("float", model)):
                s = time.perf_counter()
                m(x)
                times[key].append(time.perf_counter() - s)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratios = [a / b for a, b in zip(times["fxopt"], times["torch.ao"])]
    print(f"median ms: fxopt {med['fxopt']:.2f}, torch.ao {med['torch.ao']:.2f}, float {med['float']:.2f}")
    print(f"ratio fxopt/torch.ao (median of per-iteration ratios): {statistics.median(ratios):.3f}; "
          f"speed-up vs float: fxopt {med['float'] / med['fxopt']:.2f}x, torch.ao {med['float'] / med['torch.ao']:.2f}x")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "resnet18", int(args[1]) if len(args) > 1 else 224,
         int(args[2]) if len(args) > 2 else 50)
