"""Detector int8 retention: torchvision detectors (random weights, re-estimated BatchNorm) through fxopt's
static int8 (whole traced part) and torch.ao FX (backbone only), scored by how many of the float model's
top-10 detections the int8 model keeps (IoU >= 0.5, same label).

Used by tests/backends/test_detectors.py (slow) and runnable as a script::

    python -m bench.detectors [--backend x86|qnnpack] [--images 8]

Random weights give near-uniform class scores (every box ties at 1/91), so the models are made
"confident" the way training would: the last classification layers are scaled up until the top class
stands out. Images are synthetic scenes (coloured rectangles on a smooth background), not noise.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn as nn
import torchvision
from torchvision.ops import box_iou

import fxopt
from fxopt import recipes

from bench.quant_reference import engine as quantized_engine

DETECTORS = ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn")




def scenes(n: int, size: int = 320, seed: int = 0) -> list[torch.Tensor]:
    """``n`` synthetic RGB images in [0, 1]: a smooth gradient with 3-6 filled rectangles."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        base = torch.rand(3, 1, 1, generator=gen)
        img = (0.3 * base + 0.4 * (xx * torch.rand(1, generator=gen) + yy * torch.rand(1, generator=gen))).expand(
            3, size, size).clone()
        for _ in range(int(torch.randint(3, 7, (1,), generator=gen))):
            x0, y0 = (torch.rand(2, generator=gen) * size * 0.7).long().tolist()
            w, h = (torch.rand(2, generator=gen) * size * 0.4 + size * 0.1).long().tolist()
            img[:, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=gen)
        out.append((img + 0.02 * torch.randn(img.shape, generator=gen)).clamp(0, 1))
    return out


def _last_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are class logits / objectness."""
    if hasattr(model, "roi_heads"):  # Faster R-CNN
        return [model.roi_heads.box_predictor.cls_score, model.rpn.head.cls_logits]
    return [[m for m in block.modules() if isinstance(m, nn.Conv2d)][-1]
            for block in model.head.classification_head.module_list]


# Class-logit scale per model: top scores of about 0.5-0.8 (SSD) and above the 0.05 threshold (Faster R-CNN).
LOGIT_SCALE = {"ssdlite320_mobilenet_v3_large": 10.0, "fasterrcnn_mobilenet_v3_large_320_fpn": 30.0}


def detector(name: str, seed: int = 0, bn_gain: float = 0.95, logit_scale: float | None = None) -> nn.Module:
    """A torchvision detector with random weights, "trained-like" enough for detections to depend on the image.

    BatchNorm statistics are re-estimated from scratch on synthetic scenes (a cumulative average over 3
    batches), then every BatchNorm gain is multiplied by ``bn_gain``: a random network with fully
    normalised layers is chaotic (an input perturbation grows layer after layer, so any quantization
    destroys the output, torch.ao's too), and one with its initial statistics ignores its input (every
    image gets the same detections); 0.95 sits between. The classification layers are centred and scaled
    so the top class of a box stands out (``LOGIT_SCALE``).
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for i in range(3):
            images, _ = model.transform(scenes(2, seed=100 + i))
            features = model.backbone(images.tensors)
            if hasattr(model, "head"):  # SSD: the head has BatchNorm too
                model.head(list(features.values()))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.mul_(bn_gain)
        scale = LOGIT_SCALE.get(name, 10.0) if logit_scale is None else logit_scale
        for layer in _last_layers(model):
            # features after ReLU are positive: centre the rows so no class wins everywhere, then scale
            flat = layer.weight.flatten(1)
            flat.sub_(flat.mean(1, keepdim=True)).mul_(scale)
    return model.eval()


def top_detections(out: dict, k: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = out["scores"].argsort(descending=True)[:k]
    return out["boxes"][order], out["labels"][order], out["scores"][order]


def retention(float_outs: list[dict], int8_outs: list[dict], k: int = 10, iou: float = 0.5) -> float:
    """Fraction of the float model's top-``k`` detections that the int8 model's top-``k`` keeps:
    a box with IoU >= ``iou`` and the same label (each int8 box matches at most one float box)."""
    kept = total = 0
    for f, q in zip(float_outs, int8_outs):
        fb, fl, _ = top_detections(f, k)
        qb, ql, _ = top_detections(q, k)
        total += len(fb)
        if not len(fb) or not len(qb):
            continue
        ious = box_iou(fb, qb)
        ious[fl[:, None] != ql[None, :]] = 0
        used: set[int] = set()
        for i in range(len(fb)):
            for j in ious[i].argsort(descending=True).tolist():
                if ious[i, j] < iou:
                    break
                if j not in used:
                    used.add(j)
                    kept += 1
                    break
    return kept / max(total, 1)


def run(model: nn.Module, images: list[torch.Tensor]) -> list[dict]:
    with torch.no_grad():
        return [model([img])[0] for img in images]


def fxopt_int8(model: nn.Module, calib: list[torch.Tensor], backend: str, check: bool = False) -> nn.Module:
    data = [([img],) for img in calib]
    return fxopt.compile(model, recipes.static_int8(data, backend=backend), example_inputs=data[0],
                         backend=backend, check=check)


def torchao_backbone_int8(model: nn.Module, calib: list[torch.Tensor], backend: str) -> nn.Module:
    """torch.ao FX static int8 of ``model.backbone`` only (the by-hand route), in a copy of the detector."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = "x86" if backend == "x86" else "qnnpack"
    model = copy.deepcopy(model)
    with torch.no_grad():
        batches = [model.transform([img])[0].tensors for img in calib]
    with warnings.catch_warnings(), quantized_engine(engine):
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model.backbone, get_default_qconfig_mapping(engine), (batches[0],))
        with torch.no_grad():
            for b in batches:
                prepared(b)
        quantized = convert_fx(prepared)

    class _InEngine(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            if hasattr(model.backbone, "out_channels"):
                self.out_channels = model.backbone.out_channels

        def forward(self, x):
            with quantized_engine(engine):
                return self.inner(x)

    model.backbone = _InEngine(quantized)
    return model


def measure(name: str, backend: str = "x86", n_calib: int = 4, n_test: int = 8, check: bool = True) -> dict:
    """Retention of the float top-10 by fxopt (whole traced part int8, lowering checked against the
    reference simulation) and by torch.ao (backbone only); ``chance`` is the float model's own retention
    across two different image sets (how much of the top-10 does not depend on the image at all)."""
    model = detector(name)
    calib, test = scenes(n_calib, seed=1), scenes(n_test, seed=2)
    ref = run(model, test)
    t = time.perf_counter()
    ours = fxopt_int8(model, calib, backend, check=check)
    seconds = time.perf_counter() - t
    ao = torchao_backbone_int8(model, calib, backend)
    return {"model": name, "backend": backend, "fxopt": retention(ref, run(ours, test)),
            "torch.ao backbone": retention(ref, run(ao, test)),
            "chance": retention(ref, run(model, scenes(n_test, seed=3))),
            "float_top_score": float(sum(float(r["scores"].max()) if len(r["scores"]) else 0.0 for r in ref) / len(ref)),
            "compile_s": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="x86", choices=["x86", "qnnpack"])
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    for name in DETECTORS:
        print(measure(name, args.backend, n_test=args.images))


if __name__ == "__main__":
    main()
