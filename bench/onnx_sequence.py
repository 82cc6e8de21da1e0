"""Int8 linears on [batch, seq, hidden] inputs in ONNX Runtime: fxopt's QDQ export before / after the QGemm
rewrite vs ONNX Runtime's own ``quantize_static``, and OpenVINO before / after (the rewrites are ONNX Runtime
only: the OpenVINO IR should come out the same up to layer names, which the script prints).

    python -m bench.onnx_sequence [rounds] [transformer|textenc] [batches]

``transformer``: bench.deploy_speed's 6-layer, 384-wide pre-LN encoder (64 tokens of 64 features);
``textenc``: bench.models.TextEncoder (nn.TransformerEncoder, 6 x 384, 128 tokens). "before" is the export
without ``_linear_as_gemm`` / ``_fold_weight_transpose`` (the linears then ran as ``MatMulIntegerToFloat`` + a
float bias ``Add`` + ``QuantizeLinear``); "after" is what ``backend="onnx"`` writes now (one ``QGemm`` each).
All candidates interleaved in one process, 1 thread; SQNR against fxopt's own x86 int8.
"""

from __future__ import annotations

import re
import sys
import warnings

import torch

import fxopt
import fxopt.backends.onnx as onnx_backend
from bench import deploy_speed as ds
from fxopt import recipes
from fxopt.backends.onnx import OnnxModule
from fxopt.backends.openvino import OpenVinoModule


def build(which: str):
    if which == "textenc":
        from bench.models import TextEncoder

        torch.manual_seed(0)
        model = TextEncoder().eval()
        gen = torch.Generator().manual_seed(1)
        tokens = [torch.randint(0, 1000, (2, 128), generator=gen) for _ in range(7)]
        return model, tokens[:4], tokens[4:], lambda b: torch.randint(0, 1000, (b, 128), generator=gen), {}
    model, calib, test, make = ds.build_model("transformer", 224, 4)
    return model, calib, test, make, {"observer": "histogram", "bias_correction": True}


def main(rounds: int = 15, which: str = "transformer", batches: str = "1") -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model, calib, test, make, options = build(which)
    ex = (calib[0][:1],)
    prepared = fxopt.compile(model, recipes.static_int8(calib, **options), example_inputs=ex)
    float_onnx = fxopt.compile(model, recipes.fuse(), example_inputs=ex, backend="onnx")
    after, ov_after = fxopt.lower(prepared, "onnx").model_bytes, fxopt.lower(prepared, "openvino")
    saved = onnx_backend._linear_as_gemm, onnx_backend._fold_weight_transpose
    onnx_backend._linear_as_gemm = onnx_backend._fold_weight_transpose = lambda m: None
    try:
        before, ov_before = fxopt.lower(prepared, "onnx").model_bytes, fxopt.lower(prepared, "openvino")
    finally:
        onnx_backend._linear_as_gemm, onnx_backend._fold_weight_transpose = saved
    cands = {"fp32": model, "onnx before": OnnxModule(before, 1), "onnx after": OnnxModule(after, 1),
             "ort quant": OnnxModule(ds.ort_quantize(float_onnx, calib), 1),
             "ov before": OpenVinoModule(ov_before.xml, ov_before.weights, 1),
             "ov after": OpenVinoModule(ov_after.xml, ov_after.weights, 1)}
    def unnamed(xml: bytes) -> str:  # layer names differ between any two lowerings of one graph
        return re.sub(r'name="[^"]*"', "", xml.decode())

    same = unnamed(ov_before.xml) == unnamed(ov_after.xml) and ov_before.weights == ov_after.weights
    print(f"OpenVINO IR before == after (same .bin, same .xml up to layer names): {same}")
    x86 = fxopt.lower(prepared, "x86")
    print(f"# {ds._cpu()}; {ds._load()}; {which}, 1 thread, {rounds} interleaved rounds")
    for name in list(cands)[1:]:
        print(f"{name:12s} SQNR vs fxopt x86 int8 {ds.sqnr(x86, cands[name], test):5.1f} dB")
    for b in (int(v) for v in batches.split(",")):
        ms = ds.time_row(cands, make(b), 1, rounds, 4)
        print(f"batch {b}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
        print(f"  ort quant / onnx after {ms['ort quant'] / ms['onnx after']:.2f}; onnx before / after "
              f"{ms['onnx before'] / ms['onnx after']:.2f}; ov after / before {ms['ov after'] / ms['ov before']:.2f}")


if __name__ == "__main__":
    main(*(int(a) if i == 0 else a for i, a in enumerate(sys.argv[1:4])))
