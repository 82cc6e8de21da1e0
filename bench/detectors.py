"""Detector int8 retention: torchvision detectors (trained from scratch on synthetic shapes) through fxopt's
static int8 (whole traced part) and torch.ao FX (backbone only), scored by how many of the float model's top-10
detections the int8 model keeps (IoU >= 0.5, same label).

Used by tests/backends/test_check_zoo.py (slow) and tests/test_bench_detectors.py; runnable as a script::

    python -m bench.detectors [--backend x86|qnnpack] [--images 24] [--models NAME ...]

No download: the detectors are built with ``weights=None`` for 3 classes (rectangle, ellipse, triangle) and
trained whole, backbone included, with torchvision's own losses on freshly drawn synthetic scenes (filled
shapes on a smooth gradient, with known boxes: :func:`labelled_scenes`); the weights are cached, see
:func:`detector`. A trained detector's top-10 is what it sees in the image, and it survives an invisible input
perturbation (99-100 % of it does), so the metric measures quantization, not the ranking of noise.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.ops import box_iou

import fxopt
from fxopt import recipes
from fxopt.passes import PlaceObservers

from bench.quant_reference import engine as quantized_engine

DETECTORS = ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn")




CLASSES = ("rectangle", "ellipse", "triangle")  # labels 1, 2, 3 (0 is background)
OBJECTS = (2, 10)  # shapes per scene (min, max)
# training steps of the whole detector from scratch (see train()); a Faster R-CNN step costs about 4x an SSDlite one
TRAIN_STEPS = {"ssdlite320_mobilenet_v3_large": 2000, "fasterrcnn_mobilenet_v3_large_320_fpn": 1000}
BATCH = 8  # scenes per training step
LEARNING_RATE = 3e-3  # the one-cycle peak
ROI_SAMPLES = 128  # Faster R-CNN RoIs sampled per training image


def labelled_scenes(n: int, size: int = 320, seed: int = 0, objects: tuple[int, int] = OBJECTS
                    ) -> list[tuple[torch.Tensor, dict]]:
    """``n`` synthetic RGB scenes in [0, 1] with their targets: a smooth gradient with ``objects`` (min, max)
    filled shapes (rectangle, ellipse or upward triangle, each filling its box; boxes overlap little), colours
    that stand out from the background, a little noise.
    Targets are torchvision's ``{"boxes": (k, 4) xyxy pixels, "labels": (k,)}``."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    out = []
    for _ in range(n):
        tilt = torch.rand(2, generator=gen)
        img = (0.2 + 0.3 * torch.rand(3, 1, 1, generator=gen) + 0.3 * (xx * tilt[0] - yy * tilt[1]) / size)
        img = img.expand(3, size, size).clone()
        boxes: list[list[float]] = []
        labels = []
        wanted = int(torch.randint(objects[0], objects[1] + 1, (1,), generator=gen))
        for _ in range(20 * wanted):  # rejection sampling: a new box may cover at most 20 % of an older one
            if len(boxes) == wanted:
                break
            w, h = ((torch.rand(2, generator=gen) * 0.2 + 0.1) * size).tolist()
            x0, y0 = float(torch.rand(1, generator=gen)) * (size - w), float(torch.rand(1, generator=gen)) * (size - h)
            box = torch.tensor([[x0, y0, x0 + w, y0 + h]])
            if boxes:
                old = torch.tensor(boxes)
                inter = (torch.minimum(old[:, 2:], box[:, 2:]) - torch.maximum(old[:, :2], box[:, :2])).clamp(min=0)
                area = (old[:, 2:] - old[:, :2]).prod(1)
                if bool((inter.prod(1) > 0.2 * torch.minimum(area, torch.tensor(w * h))).any()):
                    continue
            label = int(torch.randint(1, len(CLASSES) + 1, (1,), generator=gen))
            u, v = (xx - x0) / w, (yy - y0) / h
            inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
            if label == 2:
                inside &= (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
            elif label == 3:
                inside &= v >= 2 * (u - 0.5).abs()
            background = img[:, int(y0 + h / 2), int(x0 + w / 2)]
            colour = torch.rand(3, generator=gen)
            while float((colour - background).abs().max()) < 0.3:  # visible against the gradient
                colour = torch.rand(3, generator=gen)
            img[:, inside] = colour[:, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        img = (img + 0.03 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
        out.append((img, {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}))
    return out


def scenes(n: int, size: int = 320, seed: int = 0) -> list[torch.Tensor]:
    """The images of :func:`labelled_scenes`."""
    return [img for img, _ in labelled_scenes(n, size, seed)]


def _cache_path(name: str, seed: int, steps: int) -> Path:
    root = Path(os.environ.get("FXOPT_BENCH_CACHE", Path.home() / ".cache" / "fxopt-bench"))
    return root / f"{name}-seed{seed}-trained{steps}-batch{BATCH}-roi{ROI_SAMPLES}-v2.pt"


def _reestimate_batchnorm(model: nn.Module, seed: int) -> None:
    """Fresh BatchNorm statistics for an untrained backbone (a cumulative average over 3 batches of scenes)."""
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    model.backbone.train()
    with torch.no_grad():
        for i in range(3):
            images, _ = model.transform(scenes(4, seed=100 + seed + i))
            model.backbone(images.tensors)
    model.eval()


def train(model: nn.Module, steps: int, seed: int = 0, log: bool = False,
          checkpoint: Path | None = None) -> None:
    """Train the whole detector (backbone, neck and heads, from scratch) with torchvision's own losses on
    freshly drawn labelled scenes, :data:`BATCH` per step (never the calibration or test scenes: those use
    seeds below 10,000), AdamW with a one-cycle schedule and gradient clipping. Faster R-CNN samples
    :data:`ROI_SAMPLES` RoIs per image (torchvision: 512) so a step costs about 3x less. ``checkpoint``
    gets the weights every 250 steps."""
    sampler = getattr(getattr(model, "roi_heads", None), "fg_bg_sampler", None)
    if sampler is not None:
        sampled, sampler.batch_size_per_image = sampler.batch_size_per_image, ROI_SAMPLES
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, LEARNING_RATE, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        data = labelled_scenes(BATCH, seed=10_000 + 1_000_000 * seed + step)
        losses = model([img for img, _ in data], [t for _, t in data])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        schedule.step()
        if log and (step % 25 == 0 or step == steps - 1):
            print(f"  step {step} ({time.perf_counter() - start:.0f} s): loss {float(loss.detach()):.3f}, "
                  + ", ".join(f"{k} {float(v):.3f}" for k, v in losses.items()), flush=True)
        if checkpoint is not None and (step + 1) % 250 == 0:
            torch.save(model.state_dict(), checkpoint)
    if sampler is not None:
        sampler.batch_size_per_image = sampled
    model.eval()


def detector(name: str, seed: int = 0, train_steps: int | None = None, log: bool = False) -> nn.Module:
    """A torchvision detector (``weights=None``, 3 classes: :data:`CLASSES`) trained to detect the shapes of
    :func:`labelled_scenes`, with no download: the whole model, backbone included, is trained from scratch
    for ``train_steps`` steps (:data:`TRAIN_STEPS` by default; :func:`train`). That takes tens of minutes on 2
    CPU cores the first time; the weights are then cached under ``$FXOPT_BENCH_CACHE`` or
    ``~/.cache/fxopt-bench``. ``train_steps=0`` gives the untrained detector with its backbone's BatchNorm
    statistics re-estimated on scenes (enough to check a lowering, meaningless as detections)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None,
                                                        num_classes=len(CLASSES) + 1)
    train_steps = TRAIN_STEPS[name] if train_steps is None else train_steps
    if not train_steps:
        _reestimate_batchnorm(model, seed)
        return model.eval()
    path = _cache_path(name, seed, train_steps)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        train(model, train_steps, seed, log=log, checkpoint=partial)
        torch.save(model.state_dict(), path)
        partial.unlink(missing_ok=True)
    return model.eval()


def top_detections(out: dict, k: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = out["scores"].argsort(descending=True)[:k]
    return out["boxes"][order], out["labels"][order], out["scores"][order]


def _matches(f: dict, q: dict, k: int, iou: float, min_score: float) -> tuple[int, list[float]]:
    """How many of ``f``'s top-``k`` detections scoring at least ``min_score`` there are, and the IoU of each
    one's match in ``q``'s top-``k`` (the best unused box with IoU >= ``iou`` and the same label)."""
    fb, fl, fs = top_detections(f, k)
    qb, ql, _ = top_detections(q, k)
    counted = fs >= min_score
    if not len(fb) or not len(qb):
        return int(counted.sum()), []
    ious = box_iou(fb, qb)
    ious[fl[:, None] != ql[None, :]] = 0
    used: set[int] = set()
    found = []
    for i in counted.nonzero().flatten().tolist():
        for j in ious[i].argsort(descending=True).tolist():
            if ious[i, j] < iou:
                break
            if j not in used:
                used.add(j)
                found.append(float(ious[i, j]))
                break
    return int(counted.sum()), found


def retention(float_outs: list[dict], int8_outs: list[dict], k: int = 10, iou: float = 0.5,
              min_score: float = 0.0) -> float:
    """Fraction of the float model's top-``k`` detections that the int8 model's top-``k`` keeps:
    a box with IoU >= ``iou`` and the same label (each int8 box matches at most one float box).
    ``min_score`` counts only the float detections scoring at least that (the confident ones)."""
    counts = [_matches(f, q, k, iou, min_score) for f, q in zip(float_outs, int8_outs)]
    return sum(len(found) for _, found in counts) / max(sum(total for total, _ in counts), 1)


def matched_iou(float_outs: list[dict], int8_outs: list[dict], k: int = 10) -> float:
    """Mean IoU between the float top-``k`` detections the int8 model keeps and their int8 boxes: how far
    int8 moves the boxes it keeps (1.0: not at all)."""
    found = [x for f, q in zip(float_outs, int8_outs) for x in _matches(f, q, k, 0.5, 0.0)[1]]
    return sum(found) / max(len(found), 1)


def found_objects(outs: list[dict], targets: list[dict], min_score: float = 0.5) -> float:
    """Recall against the ground truth: the fraction of the scenes' objects that a detection scoring at least
    ``min_score`` finds (IoU >= 0.5, same label, one detection per object)."""
    counts = []
    for out, target in zip(outs, targets):
        keep = out["scores"] >= min_score
        found = {k: v[keep] for k, v in out.items()}
        truth = {**target, "scores": torch.ones(len(target["boxes"]))}
        counts.append(_matches(truth, found, k=len(truth["boxes"]) + len(found["boxes"]), iou=0.5, min_score=0.0))
    return sum(len(f) for _, f in counts) / max(sum(total for total, _ in counts), 1)


def noisy(images: list[torch.Tensor], step: float = 1 / 255, seed: int = 7) -> list[torch.Tensor]:
    """``images`` with Gaussian noise of one 8-bit intensity step (std ``step``): a perturbation no camera
    pipeline would notice, to measure how much of the float top-10 survives a change that small."""
    gen = torch.Generator().manual_seed(seed)
    return [(img + step * torch.randn(img.shape, generator=gen)).clamp(0, 1) for img in images]


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


def backbone_sqnr(name: str, backend: str = "x86", n_calib: int = 4, n_test: int = 8) -> dict:
    """SQNR (dB) of each backbone output (Faster R-CNN: the FPN levels; SSDlite: the 6 feature maps) against
    float, with the backbone alone in int8: fxopt's default recipe, fxopt with min/max or plain-L2 histogram
    (clip_weight 1) activation observers, and torch.ao FX's default (the same backbone, same calibration)."""
    model = detector(name)
    with torch.no_grad():
        calib = [model.transform([img])[0].tensors for img in scenes(n_calib, seed=1)]
        test = [model.transform([img])[0].tensors for img in scenes(n_test, seed=2)]
        ref = [model.backbone(x) for x in test]

    def sqnr(backbone: nn.Module) -> list[float]:
        with torch.no_grad():
            outs = [backbone(x) for x in test]
        return [round(10 * math.log10(sum(float((r[k] ** 2).sum()) for r in ref)
                                      / sum(float(((r[k] - o[k]) ** 2).sum()) for r, o in zip(ref, outs))), 2)
                for k in ref[0]]

    def ours(observer: str = "histogram", **options) -> nn.Module:
        steps = recipes.static_int8([(x,) for x in calib], observer=observer)
        if options:
            steps = [dataclasses.replace(p, activation_options=options) if isinstance(p, PlaceObservers) else p
                     for p in steps]
        return fxopt.compile(model.backbone, steps, example_inputs=(calib[0],), backend=backend)

    return {"model": name, "backend": backend, "outputs": list(ref[0]), "fxopt": sqnr(ours()),
            "fxopt minmax": sqnr(ours("minmax")), "fxopt histogram clip_weight 1": sqnr(ours(clip_weight=1.0)),
            "torch.ao backbone": sqnr(torchao_backbone_int8(model, scenes(n_calib, seed=1), backend).backbone)}


def measure(name: str, backend: str = "x86", n_calib: int = 4, n_test: int = 24, check: bool = True) -> dict:
    """Retention of the float top-10 by fxopt (whole traced part int8, lowering checked against the
    reference simulation) and by torch.ao (backbone only); ``chance`` is the float model's own retention
    across two different image sets (how much of the top-10 does not depend on the image at all);
    ``float, input noise`` the float model's retention when the images get one 8-bit step of noise
    (:func:`noisy`): how fragile the top-10 ranking itself is. ``box IoU``: how far each model moves the boxes
    it keeps (:func:`matched_iou`); ``objects found``: recall of the scenes' true objects at score >= 0.5
    (:func:`found_objects`). When torch.ao's int8 model fails at run time
    (Faster R-CNN on qnnpack: QNNPACK rejects the FPN's 1x1 max-pool), its figures are ``None`` and
    ``torch.ao error`` says why."""
    model = detector(name)
    calib, labelled = scenes(n_calib, seed=1), labelled_scenes(n_test, seed=2)
    test, targets = [img for img, _ in labelled], [t for _, t in labelled]
    ref = run(model, test)
    t = time.perf_counter()
    ours = fxopt_int8(model, calib, backend, check=check)
    seconds = time.perf_counter() - t
    ours_out = run(ours, test)
    ao = torchao_backbone_int8(model, calib, backend)
    try:
        ao_out = run(ao, test)
    except RuntimeError as e:  # torch.ao's own lowering can fail at run time (qnnpack: FPN's 1x1 max-pool)
        ao_out, ao_error = None, str(e).strip().split(". ")[-1][:160]
    ao_figures = ({"torch.ao backbone": None, "torch.ao, float score >= 0.5": None, "torch.ao box IoU": None,
                   "torch.ao objects found": None, "torch.ao error": ao_error}
                  if ao_out is None else
                  {"torch.ao backbone": retention(ref, ao_out),
                   "torch.ao, float score >= 0.5": retention(ref, ao_out, min_score=0.5),
                   "torch.ao box IoU": matched_iou(ref, ao_out),
                   "torch.ao objects found": found_objects(ao_out, targets)})
    return {"model": name, "backend": backend, "fxopt": retention(ref, ours_out),
            "fxopt, float score >= 0.5": retention(ref, ours_out, min_score=0.5),
            "fxopt box IoU": matched_iou(ref, ours_out), "fxopt objects found": found_objects(ours_out, targets),
            **ao_figures, "float objects found": found_objects(ref, targets),
            "chance": retention(ref, run(model, scenes(n_test, seed=3))),
            "float, input noise": retention(ref, noise_out := run(model, noisy(test))),
            "float, input noise, float score >= 0.5": retention(ref, noise_out, min_score=0.5),
            "float, input noise, box IoU": matched_iou(ref, noise_out),
            "float detections >= 0.5": sum(int((r["scores"] >= 0.5).sum()) for r in ref),
            "float_top_score": float(sum(float(r["scores"].max()) if len(r["scores"]) else 0.0 for r in ref) / len(ref)),
            "compile_s": round(seconds, 1)}


def speed(name: str, backend: str = "x86", threads: int = 1, rounds: int = 10, iters: int = 5) -> fxopt.LatencyComparison:
    """Batch-1 latency of the float detector, fxopt's int8 (whole traced part) and torch.ao's backbone-only
    int8, interleaved in one process (:func:`fxopt.benchmark_many`) on one test scene."""
    model = detector(name)
    calib, image = scenes(4, seed=1), scenes(1, seed=2)[0]
    candidates = {"float": model, "fxopt int8": fxopt_int8(model, calib, backend),
                  "torch.ao int8 backbone": torchao_backbone_int8(model, calib, backend)}
    with torch.no_grad():
        return fxopt.benchmark_many(candidates, ([image],), rounds=rounds, iters=iters, threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="x86", choices=["x86", "qnnpack"])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--models", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    parser.add_argument("--backbone-sqnr", action="store_true",
                        help="per-output SQNR of the backbone alone in int8 (fxopt observers, torch.ao) instead")
    parser.add_argument("--speed", type=int, metavar="THREADS",
                        help="batch-1 latency of float / fxopt int8 / torch.ao backbone int8 at THREADS threads instead")
    args = parser.parse_args()
    for name in args.models:
        if args.speed:
            print(name, args.backend, f"{args.speed} thread(s)", speed(name, args.backend, args.speed), sep="\n")
        else:
            print(backbone_sqnr(name, args.backend) if args.backbone_sqnr
                  else measure(name, args.backend, n_test=args.images))


if __name__ == "__main__":
    main()
