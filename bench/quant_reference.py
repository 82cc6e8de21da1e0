"""Shared helpers for comparing fxopt's static int8 with torch.ao's FX flow (the deprecated reference).

Used by bench/ suites and tests only: library code never touches torch.ao.quantization's flows.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
import torchvision

import fxopt
from fxopt import recipes

ZOO = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_0", "efficientnet_b0",
       "densenet121", "googlenet", "regnet_x_400mf", "squeezenet1_1"]


@contextmanager
def engine(name: str):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def zoo_model(name: str, size: int = 96, seed: int = 0, warm_batches: int = 4) -> torch.nn.Module:
    """A torchvision model with random weights whose BatchNorm statistics have seen data (train mode)."""
    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    model.train()
    with torch.no_grad():
        for _ in range(warm_batches):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def data(size: int, n_calib: int = 8, n_test: int = 4, batch: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    calib = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n_calib)]
    test = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n_test)]
    return calib, test


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def natural_images(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``n`` natural-looking images, ImageNet-normalized, no download.

    Even indices: random crops (random scale, flip) of scikit-learn's two bundled photos (china, flower);
    odd indices: smooth random colour fields (sums of low-frequency noise octaves), which have the 1/f-like
    spectrum of natural images rather than white noise's.
    """
    from sklearn.datasets import load_sample_images

    gen = torch.Generator().manual_seed(seed)
    photos = [torch.from_numpy(img).permute(2, 0, 1).float() / 255.0 for img in load_sample_images().images]
    out = []
    for i in range(n):
        if i % 2 == 0:
            photo = photos[int(torch.randint(len(photos), (1,), generator=gen))]
            h, w = photo.shape[1:]
            side = int(torch.randint(size // 2, min(h, w) + 1, (1,), generator=gen))
            top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
            crop = photo[:, top:top + side, left:left + side].unsqueeze(0)
            img = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
            if bool(torch.rand((), generator=gen) < 0.5):
                img = img.flip(-1)
        else:
            img = torch.zeros(3, size, size)
            for octave in range(1, 6):
                cells = 2 ** octave
                noise = torch.rand(1, 3, cells, cells, generator=gen)
                img += torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic",
                                                       align_corners=False)[0] / (1.6 ** octave)
            lo, hi = img.amin((1, 2), keepdim=True), img.amax((1, 2), keepdim=True)
            img = (img - lo) / (hi - lo + 1e-6)
        out.append((img.clamp(0, 1) - _MEAN) / _STD)
    return torch.stack(out)


def natural_zoo_model(name: str, size: int = 224, seed: int = 0, bn_images: int = 32) -> torch.nn.Module:
    """A torchvision model with random weights whose BatchNorm statistics are re-estimated on natural images."""
    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the re-estimation batches
    model.train()
    images = natural_images(bn_images, size, seed=seed + 100)
    with torch.no_grad():
        for batch in images.split(8):
            model(batch)
    return model.eval()


def natural_data(size: int = 224, n_calib: int = 16, n_test: int = 8, batch: int = 4, seed: int = 1):
    """16 calibration images (in batches of ``batch``) and held-out test images, all natural-looking."""
    images = natural_images(n_calib + n_test, size, seed=seed)
    return list(images[:n_calib].split(batch)), list(images[n_calib:].split(batch))


def fxopt_int8(model, calib, backend: str, observer: str = "histogram", **options):
    return fxopt.compile(model, recipes.static_int8(calib, backend=backend, observer=observer, **options),
                         example_inputs=(calib[0][:1],), backend=backend)


def torchao_int8(model, calib, backend: str):
    """torch.ao FX static int8 with its default qconfig mapping for the engine (reference only)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    qengine = "x86" if backend == "x86" else "qnnpack"
    with warnings.catch_warnings(), engine(qengine):
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(qengine), (calib[0][:1],))
        with torch.no_grad():
            for batch in calib:
                prepared(batch)
        return convert_fx(prepared)


def sqnr(model, candidate, test, backend: str) -> float:
    qengine = "x86" if backend == "x86" else "qnnpack"
    with engine(qengine):
        return fxopt.compare(model, candidate, test).sqnr_db
