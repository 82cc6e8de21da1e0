"""Hugging Face BERT (all-MiniLM-L6-v2 size, random init, config in code): float vs fxopt int8.

    python -m bench.bench_transformers [iters] [threads]   # one process: sizes, cosines, interleaved latency
    python -m bench.bench_transformers backends [iters] [threads] [encoder,bert]   # static int8: x86/onnx/openvino

``backends``: the 6-layer, 384-wide ``nn.TransformerEncoder`` text encoder (``bench.models.TextEncoder``) and the
BERT below, each float (eager) vs ``recipes.static_int8`` lowered to ``x86``, ``onnx`` and ``openvino``, batch 1 x
128 tokens: SQNR of the output (last hidden state) vs float on held-out batches, and the speed-up over fp32 eager,
all candidates interleaved in one process. What stays float: softmax, GELU, the scale multiply, the masks,
and the residual adds and LayerNorms (``DecomposeAttention`` keeps the residual stream float); on x86 also
attention itself (PyTorch has no int8 matmul: one float ``F.scaled_dot_product_attention``), on onnx /
openvino the attention MatMuls are int8 (both operands symmetric int8).
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
import transformers

import fxopt
from fxopt import recipes

warnings.filterwarnings("ignore")
VOCAB = 30522


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, max_position_embeddings=512)
    return transformers.BertModel(config).eval()


def batch(size: int, length: int, seed: int, ragged: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    if ragged:
        for i in range(size):
            mask[i, int(torch.randint(8, length + 1, (1,), generator=g)):] = 0
    return ids, mask


def pooled(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(ids, mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    w = mask.unsqueeze(-1).float()
    return (hidden * w).sum(1) / w.sum(1)


def float_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def main(iters: int = 10, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    model = bert()
    example = batch(2, 16, seed=0, ragged=False)
    calibration = [batch(8, 64, seed=s) for s in range(1, 9)]
    variants: dict[str, torch.nn.Module] = {"float": model}
    compile_s = {}
    start = time.perf_counter()
    variants["fxopt dynamic int8"] = fxopt.compile(model, recipes.dynamic_int8(), example_inputs=example)
    compile_s["fxopt dynamic int8"] = time.perf_counter() - start
    start = time.perf_counter()
    variants["fxopt static int8 (x86)"] = fxopt.compile(model, recipes.static_int8(calibration),
                                                       example_inputs=example, backend="x86")
    compile_s["fxopt static int8 (x86)"] = time.perf_counter() - start
    variants["torch.ao dynamic"] = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8)

    test = [batch(8, 64, seed=100 + s) for s in range(4)]
    reference = torch.cat([pooled(model, *b) for b in test])
    print(f"CPU threads: {torch.get_num_threads()}; torch {torch.__version__}; transformers {transformers.__version__}")
    print(f"{'variant':26s} {'MB':>7s} {'cos min':>8s} {'cos mean':>8s} {'compile s':>9s}")
    for name, module in variants.items():
        emb = torch.cat([pooled(module, *b) for b in test])
        cos = torch.nn.functional.cosine_similarity(emb, reference)
        size = float_bytes(model) if name == "float" else (
            fxopt.report(module).total_bytes if name.startswith("fxopt") else float("nan"))
        print(f"{name:26s} {size / 2**20:7.1f} {cos.min().item():8.5f} {cos.mean().item():8.5f} "
              f"{compile_s.get(name, float('nan')):9.1f}")
    for size, length in ((1, 128), (8, 64)):
        inputs = batch(size, length, seed=7, ragged=False)
        comparison = fxopt.benchmark_many(variants, inputs, rounds=5, iters=iters, warmup=3, threads=threads)
        print(f"\nbatch {size} x {length} tokens, {threads} thread(s), interleaved:")
        for name, timing in comparison.timings.items():
            print(f"  {name:26s} {timing.median_ms:8.2f} ms  x{comparison.speedup[name]:.2f} vs float")


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-30)))


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def static_backends(name: str, model: torch.nn.Module, example: tuple, calibration: list, test: list,
                    timed: tuple, iters: int, threads: int) -> None:
    """float eager vs fxopt static int8 on x86 / onnx / openvino: SQNR vs float on ``test``, interleaved speed."""
    torch.set_num_threads(threads)
    variants: dict[str, torch.nn.Module] = {"fp32 eager": model}
    for backend in ("x86", "onnx", "openvino"):
        start = time.perf_counter()
        variants[f"static int8 {backend}"] = fxopt.compile(model, recipes.static_int8(calibration),
                                                          example_inputs=example, backend=backend)
        print(f"  compiled {backend} in {time.perf_counter() - start:.0f} s", flush=True)
    with torch.inference_mode():
        refs = [_hidden(model(*b)) for b in test]
        sqnr = {n: sum(_sqnr(r, _hidden(m(*b))) for r, b in zip(refs, test)) / len(test)
                for n, m in variants.items() if n != "fp32 eager"}
    comparison = fxopt.benchmark_many(variants, timed, rounds=7, iters=iters, warmup=3, threads=threads)
    print(f"\n{name}: batch {timed[0].shape[0]} x {timed[0].shape[1]} tokens, {threads} thread(s), interleaved")
    print(f"{'variant':22s} {'SQNR dB':>8s} {'ms':>8s} {'speed-up':>9s}")
    for n, timing in comparison.timings.items():
        db = f"{sqnr[n]:8.1f}" if n in sqnr else f"{'-':>8s}"
        print(f"{n:22s} {db} {timing.median_ms:8.2f} x{comparison.speedup[n]:8.2f}")


def backends_main(iters: int = 10, threads: int = 1, models: str = "encoder,bert") -> None:
    from bench.models import TextEncoder

    if "encoder" in models:
        torch.manual_seed(0)
        encoder = TextEncoder().eval()  # 6 layers, 384 wide, 6 heads, ff 1536, post-norm GELU, batch_first
        g = torch.Generator().manual_seed(1)
        tokens = [(torch.randint(0, 1000, (2, 128), generator=g),) for _ in range(9)]
        static_backends("nn.TransformerEncoder 6x384", encoder, tokens[0], tokens[1:5], tokens[5:],
                        (torch.randint(0, 1000, (1, 128), generator=g),), iters, threads)
    if "bert" in models:
        # batch 1 throughout: the ONNX file of the exported BERT graph keeps the example's batch size
        static_backends("BERT 6x384 (MiniLM size)", bert(), batch(1, 128, seed=0, ragged=False),
                        [batch(1, 128, seed=s) for s in range(1, 9)], [batch(1, 128, seed=s) for s in range(50, 56)],
                        batch(1, 128, seed=7, ragged=False), iters, threads)


if __name__ == "__main__":
    if sys.argv[1:2] == ["backends"]:
        backends_main(*(int(a) for a in sys.argv[2:4]), *sys.argv[4:5])
    else:
        main(*(int(a) for a in sys.argv[1:3]))
