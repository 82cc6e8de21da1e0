"""``fxopt demo``: train a small CNN on scikit-learn's bundled digits and compile it with every recipe.

Prints one table: recipe, backend, test accuracy, bytes, batch-1 latency median and speed-up vs float.
Everything runs offline in well under two minutes on two cores.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DigitsCNN", "DigitsMLP", "load_digits_tensors", "train", "accuracy", "run"]


class DigitsCNN(nn.Module):
    """A small CNN for 1x16x16 inputs (the 8x8 digits upsampled)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(128, classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(self.dropout(torch.flatten(x, 1)))


class DigitsMLP(nn.Module):
    """An MLP on the flattened 8x8 digits (for dynamic int8)."""

    def __init__(self, classes: int = 10, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def load_digits_tensors(image_size: int = 16, seed: int = 0):
    """(x_train, y_train, x_test, y_test) from sklearn's digits, images scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=digits.target)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False) if image_size != 8 else x
    x = (x - 0.5) / 0.5
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 8, lr: float = 2e-3,
          batch: int = 64, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item() * 100


def run(threads: int | None = 1, seed: int = 0) -> str:
    """Train, compile with every recipe, measure; return the table as text."""
    from tabulate import tabulate

    import fxopt
    from fxopt import recipes

    torch.manual_seed(seed)
    start = time.perf_counter()
    xtr, ytr, xte, yte = load_digits_tensors(16, seed)
    cnn = train(DigitsCNN(), xtr, ytr, seed=seed)
    xtr8, _, xte8, _ = load_digits_tensors(8, seed)
    mlp = train(DigitsMLP(), xtr8.flatten(1), ytr, epochs=30, lr=1e-3, seed=seed)
    calib = [xtr[i : i + 32] for i in range(0, 32 * 16, 32)]
    one, one8 = xte[:1], xte8[:1].flatten(1)

    builds: list[tuple[str, str, Callable[[], nn.Module], torch.Tensor, torch.Tensor, str]] = [
        ("float", "eager", lambda: cnn, xte, one, "cnn"),
        ("fuse", "eager", lambda: fxopt.compile(cnn, recipes.fuse(), example_inputs=one), xte, one, "cnn"),
        ("static_int8", "x86", lambda: fxopt.compile(cnn, recipes.static_int8(calib, backend="x86"),
                                                     example_inputs=one, backend="x86"), xte, one, "cnn"),
        ("static_int8", "qnnpack", lambda: fxopt.compile(cnn, recipes.static_int8(calib, backend="qnnpack"),
                                                         example_inputs=one, backend="qnnpack"), xte, one, "cnn"),
        ("fp16", "eager", lambda: fxopt.compile(cnn, recipes.fp16(), example_inputs=one), xte, one, "cnn"),
        ("float (mlp)", "eager", lambda: mlp, xte8.flatten(1), one8, "mlp"),
        ("dynamic_int8 (mlp)", "x86", lambda: fxopt.compile(mlp, recipes.dynamic_int8(), example_inputs=one8),
         xte8.flatten(1), one8, "mlp"),
    ]
    built = []
    for recipe, backend, build, x_eval, example, family in builds:
        model = build()
        built.append((recipe, backend, model, accuracy(model, x_eval, yte), fxopt.report(model).total_bytes,
                      example, family, x_eval))
    # Latency: every model of a family timed interleaved in one run, so the ratios are comparable.
    medians: dict[tuple[str, int], float] = {}
    for family in ("cnn", "mlp"):
        members = {f"{i}": b[2] for i, b in enumerate(built) if b[6] == family}
        example = next(b[5] for b in built if b[6] == family)
        x_eval = next(b[7] for b in built if b[6] == family)
        for batch, x in ((1, example), (64, x_eval[:64])):
            timing = fxopt.benchmark_many(members, (x,), rounds=6, iters=50 if batch == 1 else 10, warmup=10,
                                          threads=threads)
            medians.update({(k, batch): t.median_ms for k, t in timing.timings.items()})
    rows, base = [], {}
    for i, (recipe, backend, _model, acc, size, _example, family, _x) in enumerate(built):
        b1, b64 = medians[(f"{i}", 1)], medians[(f"{i}", 64)]
        base.setdefault(family, (b1, b64))
        rows.append([recipe, backend, f"{acc:.2f}", size, f"{b1:.3f}", f"{base[family][0] / b1:.2f}x",
                     f"{base[family][1] / b64:.2f}x"])
    table = tabulate(rows, headers=["recipe", "backend", "test acc %", "bytes", "b1 median ms",
                                         "b1 speed-up", "b64 speed-up"])
    return table + (f"\n(digits test set: {len(yte)} images; latency at batch 1 and 64, {threads or torch.get_num_threads()} "
                     f"thread(s), models timed interleaved; total demo time {time.perf_counter() - start:.0f} s)")
