"""Static int8 SQNR vs float: fxopt against torch.ao FX on the torchvision zoo, both engines.

    python -m bench.quant_numerics [--size 96] [--models resnet18,mobilenet_v2]
    python -m bench.quant_numerics --natural [--min-sqnr 30] [--models ...]

Prints one table; the same comparison runs as a (slow) test in tests/quant/test_zoo_numerics.py.

``--natural``: 224-px natural-looking images (crops of scikit-learn's bundled photos and smooth random
fields, bench/quant_reference.natural_images), BatchNorm statistics re-estimated on such images, 16
calibration images, 8 held-out test images, x86 only. Columns: SQNR and top-1 agreement of fxopt's default
static recipe and of torch.ao FX (histogram observers for both), then fxopt with ``--options`` (e.g.
``equalize=1,bias_correction=1``) and with ``min_sqnr`` (the float fallback: float ops / total and why).
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

from bench.quant_reference import (ZOO, data, fxopt_int8, natural_data, natural_zoo_model, sqnr,
                             torchao_int8, zoo_model)

import fxopt


def _agreement(model, candidate, test) -> float:
    with torch.no_grad():
        hits = [(model(x).argmax(1) == candidate(x).argmax(1)).float() for x in test]
    return float(torch.cat(hits).mean())


def _parse_options(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key] = bool(int(value)) if value in ("0", "1") else float(value)
    return out


def natural(args) -> None:
    torch.set_num_threads(args.threads)
    options = _parse_options(args.options)
    rows = []
    for name in args.models.split(","):
        model = natural_zoo_model(name, 224)
        calib, test = natural_data(224)
        t = time.perf_counter()
        ours = fxopt_int8(model, calib, "x86")
        t_ours = time.perf_counter() - t
        ao = torchao_int8(model, calib, "x86")
        row = [name, sqnr(model, ours, test, "x86"), sqnr(model, ao, test, "x86")]
        row.append(row[1] - row[2])
        row += [_agreement(model, ours, test), _agreement(model, ao, test)]
        tuned = fxopt_int8(model, calib, "x86", **options) if options else None
        row.append(sqnr(model, tuned, test, "x86") if tuned is not None else float("nan"))
        guarded = fxopt_int8(model, calib, "x86", min_sqnr=args.min_sqnr, **options)
        rec = [r for r in fxopt.records(guarded) if r.name.startswith("float-fallback")][0]
        kept = rec.stats.get("kept_float", [])
        row += [sqnr(model, guarded, test, "x86"), f"{len(kept)}/{rec.stats['units']}",
                rec.stats.get("float_mac_fraction", 0.0), f"{t_ours:.0f}"]
        rows.append(row)
        print([f"{v:.2f}" if isinstance(v, float) else v for v in row], rec.notes[-1:], flush=True)
    print(tabulate(rows, floatfmt=".2f", headers=[
        "model", "fxopt dB", "torch.ao dB", "Δ dB", "fxopt top1 agr", "ao top1 agr", f"fxopt {args.options or '-'} dB",
        f"min_sqnr={args.min_sqnr:g} dB", "float ops", "float MAC share", "fxopt s"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--backends", default="x86,qnnpack")
    parser.add_argument("--natural", action="store_true", help="224-px natural images, 16 calibration images")
    parser.add_argument("--min-sqnr", type=float, default=30.0)
    parser.add_argument("--options", default="", help="extra static_int8 options, e.g. equalize=1,bias_correction=1")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.natural:
        natural(args)
        return
    torch.set_num_threads(2)
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
