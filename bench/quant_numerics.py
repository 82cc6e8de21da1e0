"""Static int8 SQNR vs float: fxopt against torch.ao FX on the torchvision zoo, both engines.

    python -m bench.quant_numerics [--size 96] [--models resnet18,mobilenet_v2]
    python -m bench.quant_numerics --natural [--min-sqnr 30] [--models ...]
    python -m bench.quant_numerics --adaround --models resnet18 [--adaround-iters 300]

Prints one table; the same comparison runs as a (slow) test in tests/quant/test_zoo_numerics.py.

``--natural``: 224-px natural-looking images (crops of scikit-learn's bundled photos and smooth random
fields, bench/quant_reference.natural_images), BatchNorm statistics re-estimated on such images, 16
calibration images, 32 held-out test images (``--test-images``; 8 proved too few to rank two flows on
these random-weight networks, whose per-batch SQNR varies by several dB), x86 only, 1 thread.
Columns: SQNR and top-1 agreement of fxopt's default static recipe and of torch.ao FX (histogram
observers for both), then fxopt with each ``--options`` set (e.g.
``"headroom=auto;bias_correction=1;bias_correction=analytical;equalize=1"``: one column each) and with
``min_sqnr`` (the float fallback: float ops / total and why).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from tabulate import tabulate

from bench.quant_reference import (ZOO, data, engine, fxopt_int8, natural_data, natural_zoo_model, sqnr,
                                   torchao_int8, zoo_model)

import fxopt


def _outputs(model, test) -> list[torch.Tensor]:
    with torch.no_grad(), engine("x86"):
        out = [model(x) for x in test]
    return [o.dequantize() if o.is_quantized else o for o in out]


def _sqnr(ref: list, out: list) -> float:
    signal = sum(float(r.double().pow(2).sum()) for r in ref)
    noise = sum(float((r.double() - o.double()).pow(2).sum()) for r, o in zip(ref, out))
    return 10 * math.log10(signal / noise) if noise else math.inf


def _agreement(ref: list, out: list) -> float:
    return float(torch.cat([(r.argmax(1) == o.argmax(1)).float() for r, o in zip(ref, out)]).mean())


def _parse_options(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key] = bool(int(value)) if value in ("0", "1") else (float(value) if value.replace(".", "").isdigit()
                                                                 else value)
    return out


def natural(args) -> None:
    """One process, one thread: each model and its images are built once; float outputs computed once."""
    torch.set_num_threads(args.threads)
    option_sets = [(text, _parse_options(text)) for text in args.options.split(";") if text]
    rows = []
    calib, test = natural_data(224, n_test=args.test_images)
    for name in args.models.split(","):
        model = natural_zoo_model(name, 224)
        ref = _outputs(model, test)
        t = time.perf_counter()
        ours = _outputs(fxopt_int8(model, calib, "x86"), test)
        t_ours = time.perf_counter() - t
        ao = _outputs(torchao_int8(model, calib, "x86"), test)
        row = [name, _sqnr(ref, ours), _sqnr(ref, ao)]
        row.append(row[1] - row[2])
        row += [_agreement(ref, ours), _agreement(ref, ao)]
        for _, options in option_sets:
            row.append(_sqnr(ref, _outputs(fxopt_int8(model, calib, "x86", **options), test)))
        why = []
        if args.min_sqnr > 0:
            guarded = fxopt_int8(model, calib, "x86", min_sqnr=args.min_sqnr)
            rec = [r for r in fxopt.records(guarded) if r.name.startswith("float-fallback")][0]
            kept = rec.stats.get("kept_float", [])
            row += [_sqnr(ref, _outputs(guarded, test)), f"{len(kept)}/{rec.stats['units']}",
                    rec.stats.get("float_mac_fraction", 0.0)]
            why = [n for n in rec.notes if n.startswith("target")]
        row.append(f"{t_ours:.0f}")
        rows.append(row)
        print([f"{v:.2f}" if isinstance(v, float) else v for v in row], why, flush=True)
    headers = ["model", "fxopt dB", "torch.ao dB", "Δ dB", "fxopt top1 agr", "ao top1 agr"]
    headers += [f"fxopt {text} dB" for text, _ in option_sets]
    if args.min_sqnr > 0:
        headers += [f"min_sqnr={args.min_sqnr:g} dB", "float ops", "float MAC share"]
    headers.append("fxopt s")
    print(tabulate(rows, floatfmt=".2f", headers=headers))


def adaround(args) -> None:
    """AdaRound vs round-to-nearest on natural images: 4-bit weights (activations float, so only the weight
    rounding is measured) and the full int8 x86 model, SQNR on the held-out images."""
    from fxopt import passes as fp
    from fxopt import recipes

    torch.set_num_threads(args.threads)
    calib, test = natural_data(224, n_test=args.test_images)
    rows = []
    for name in args.models.split(","):
        model = natural_zoo_model(name, 224)
        ref = _outputs(model, test)
        row = [name]
        for iters in (0, args.adaround_iters):
            steps = recipes.static_int8(calib)
            steps.insert([p.name for p in steps].index("calibrate") + 1,
                         fp.AdaRound(calib, iters=iters, weight_bits=4))
            t = time.perf_counter()
            prepared = fxopt.compile(model, steps, example_inputs=(calib[0][:1],))
            row += [_sqnr(ref, _outputs(prepared, test)), time.perf_counter() - t]
        plain = fxopt_int8(model, calib, "x86")
        learned = fxopt_int8(model, calib, "x86", adaround=args.adaround_iters)
        row += [_sqnr(ref, _outputs(plain, test)), _sqnr(ref, _outputs(learned, test))]
        rows.append(row)
        print(rows[-1], flush=True)
    print(tabulate(rows, floatfmt=".2f", headers=[
        "model", "4-bit weights, nearest dB", "s", f"4-bit AdaRound ({args.adaround_iters} it) dB", "s",
        "int8 x86 dB", "int8 x86 + AdaRound dB"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--backends", default="x86,qnnpack")
    parser.add_argument("--natural", action="store_true", help="224-px natural images, 16 calibration images")
    parser.add_argument("--min-sqnr", type=float, default=30.0, help="--natural: 0 skips the float fallback")
    parser.add_argument("--options", default="", help="extra static_int8 options, e.g. equalize=1,bias_correction=1; "
                        "several sets separated by ';' give one column each")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--test-images", type=int, default=32, help="--natural: held-out images")
    parser.add_argument("--adaround", action="store_true",
                        help="AdaRound vs nearest (4-bit weights, and int8 x86) on the natural images")
    parser.add_argument("--adaround-iters", type=int, default=300)
    args = parser.parse_args()
    if args.adaround:
        adaround(args)
        return
    if args.natural:
        natural(args)
        return
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model = zoo_model(name, args.size)
        calib, test = data(args.size)
        row = [name]
        for backend in args.backends.split(","):
            t = time.perf_counter()
            ours = sqnr(model, fxopt_int8(model, calib, backend), test, backend)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            ref = sqnr(model, torchao_int8(model, calib, backend), test, backend)
            t_ref = time.perf_counter() - t
            row += [f"{ours:.2f}", f"{ref:.2f}", f"{ours - ref:+.2f}", f"{t_ours:.1f}/{t_ref:.1f}"]
        rows.append(row)
        print(rows[-1], flush=True)
    headers = ["model"]
    for backend in args.backends.split(","):
        headers += [f"fxopt {backend} dB", f"torch.ao {backend} dB", "Δ dB", "time s (ours/ao)"]
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
