"""Dynamic int8 and FP16 latency: float vs fxopt vs torch.ao ``quantize_dynamic`` (the reference).

    pytest bench/bench_dynamic.py --benchmark-only          # pytest-benchmark tables
    python -m bench.bench_dynamic [iters]                   # interleaved ratios + cosines, one process

Models: the 3-layer LSTM encoder (hidden 256, 160 steps, trained-like weights) and the 6-layer text
encoder (d_model 384, 6 heads, ff 1536) of ``bench/models.py``; resnet18 for FP16.
Batch 1, 2 threads. torch.ao is used only here and in tests, as the reference.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import pytest
import torch
import torchvision

import fxopt
from bench import models
from fxopt import passes as fp

warnings.filterwarnings("ignore")



def _lstm_case():
    model = models.LSTMEncoder(hidden=256, layers=3)
    return model, models.features(1, 160, 80)


def _encoder_case():
    torch.manual_seed(0)
    return models.TextEncoder().eval(), torch.randint(0, 1000, (1, 128))


class _NoFastPath(torch.nn.Module):
    """torch.ao's Linear replacements crash nn.TransformerEncoder's eval fast path; run without it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return models.run_ao(self.inner, x)


def variants(case: str) -> tuple[dict[str, torch.nn.Module], torch.Tensor]:
    model, x = _lstm_case() if case == "lstm" else _encoder_case()
    ao = models.torch_ao_dynamic(model)
    return {
        "float": model,
        "fxopt": models.fxopt_dynamic(model, x),
        "torch.ao": ao if case == "lstm" else _NoFastPath(ao),
    }, x


def fp16_variants() -> tuple[dict[str, torch.nn.Module], torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    return {
        "float": model,
        "fp16 (upcast)": fxopt.compile(model, [fp.ConvertFP16()], example_inputs=(x,)),
        "fp16 (fp16 compute)": fxopt.compile(model, [fp.ConvertFP16(compute="fp16")], example_inputs=(x,)),
    }, x


pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.mark.parametrize("variant", ["float", "fxopt", "torch.ao"])
@pytest.mark.parametrize("case", ["lstm", "encoder"])
def test_dynamic_latency(benchmark, case, variant):
    mods, x = variants(case)
    module = mods[variant]
    with torch.inference_mode():
        benchmark(module, x)


@pytest.mark.parametrize("variant", ["float", "fp16 (upcast)", "fp16 (fp16 compute)"])
def test_fp16_latency(benchmark, variant):
    mods, x = fp16_variants()
    with torch.inference_mode():
        benchmark(mods[variant], x)


def interleaved(mods: dict[str, torch.nn.Module], x: torch.Tensor, iters: int) -> dict[str, float]:
    """Median ms per variant, the variants timed in turn within each iteration."""
    times: dict[str, list[float]] = {k: [] for k in mods}
    with torch.inference_mode():
        for m in mods.values():
            m(x)
        for _ in range(iters):
            for name, m in mods.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(iters: int = 30) -> None:
    torch.set_num_threads(2)
    for case in ("lstm", "encoder"):
        mods, x = variants(case)
        with torch.inference_mode():
            ref = mods["float"](x)
            cos = {k: models.mean_cosine(m(x), ref) for k, m in mods.items() if k != "float"}
        ms = interleaved(mods, x, iters)
        print(f"{case}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
        print("  cosine vs float: " + ", ".join(f"{k} {v:.4f}" for k, v in cos.items()))
        print(f"  speed-up vs float: fxopt {ms['float'] / ms['fxopt']:.2f}x, torch.ao {ms['float'] / ms['torch.ao']:.2f}x;"
              f" fxopt / torch.ao latency {ms['fxopt'] / ms['torch.ao']:.2f}")
    mods, x = fp16_variants()
    with torch.inference_mode():
        ref = mods["float"](x)
        sq = {k: (10 * torch.log10(ref.pow(2).mean() / (ref - m(x)).pow(2).mean())).item()
              for k, m in mods.items() if k != "float"}
    ms = interleaved(mods, x, iters)
    print("resnet18 fp16: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    print("  SQNR vs float: " + ", ".join(f"{k} {v:.1f} dB" for k, v in sq.items()))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
