"""``fxopt demo``: every recipe on a model where it is the right tool, on real data, in one table.

Two small models are trained on scikit-learn's bundled digits (offline, seconds on two cores):

* a CNN on the 16x16 images, for the recipes that act on convolutions (fuse, static int8, FP16, ...);
* an LSTM that reads each image row by row (16 steps of 16 pixels), for the dynamic recipes
  (dynamic int8 quantizes LSTM and Linear weights; activations are quantized on the fly).

Each line of the table is a :class:`DemoRow` in :data:`ROWS`. A row names its recipe, backend and model,
says how to build the optimized module from the trained one, which parts of fxopt it needs (rows whose
recipe or backend has not landed are skipped, and listed as skipped), and one line on why it may lose
(shown when it is slower than float or loses accuracy). Adding a recipe to the demo is one
``ROWS.append(DemoRow(...))``.

Latency: all models of one family are timed interleaved in one process (``fxopt.benchmark_many``),
batch 1; FPS is the throughput at batch 32.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .progress import bar

__all__ = ["DigitsCNN", "DigitsMLP", "DigitsLSTM", "load_digits_tensors", "train", "accuracy", "DemoRow",
           "DemoContext", "DemoResult", "ROWS", "run", "artifact_bytes", "plot"]


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
    """An MLP on the flattened 8x8 digits."""

    def __init__(self, classes: int = 10, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


class DigitsLSTM(nn.Module):
    """An LSTM reading a 16x16 digit image row by row (input ``(batch, 16, 16)``)."""

    def __init__(self, classes: int = 10, hidden: int = 256, layers: int = 1, row: int = 16):
        super().__init__()
        self.lstm = nn.LSTM(row, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def load_digits_tensors(image_size: int = 16, seed: int = 0):
    """(x_train, y_train, x_test, y_test) from sklearn's digits, images scaled to [-1, 1]."""
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
          batch: int = 64, seed: int = 0, desc: str | None = None) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    epochs_iter = bar(range(epochs), desc, unit="epoch") if desc else range(epochs)
    for _ in epochs_iter:
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


# ---- the rows ------------------------------------------------------------------------------------


@dataclass
class DemoContext:
    """What row builders get: the trained models, data and calibration batches per family."""

    models: dict[str, nn.Module]  # family -> trained float model
    train_x: dict[str, torch.Tensor]
    train_y: torch.Tensor
    test_x: dict[str, torch.Tensor]
    test_y: torch.Tensor
    calibration: dict[str, list[torch.Tensor]]

    def example(self, family: str) -> torch.Tensor:
        return self.test_x[family][:1]


@dataclass
class DemoRow:
    """One line of the demo table.

    ``build(ctx)`` returns the optimized module for ``ctx.models[family]`` (never mutating it).
    ``requires`` lists what must exist: ``"recipes.NAME"``, ``"backend:NAME"``, or ``"fxopt.NAME"``.
    ``loses`` is the one line shown when the row is slower than float or drops accuracy.
    """

    recipe: str
    backend: str
    family: str
    build: Callable[[DemoContext], nn.Module]
    requires: tuple[str, ...] = ()
    loses: str = ""

    def missing(self) -> str | None:
        """What this row needs and this install lacks, or ``None``."""
        import fxopt
        from fxopt import backends, recipes

        for need in self.requires:
            kind, _, name = need.partition(":") if need.startswith("backend:") else need.partition(".")
            if kind == "backend" and name not in backends.available():
                return f"backend {name!r} not available"
            if kind == "recipes" and name not in getattr(recipes, "__all__", ()):
                return f"recipe {name!r} not in fxopt.recipes yet"
            if kind == "fxopt" and not hasattr(fxopt, name):
                return f"fxopt.{name} not available"
        return None


def _compile(ctx: DemoContext, family: str, recipe: str, *args: Any, backend: str | None = None,
             lower: bool = False, **kwargs: Any) -> nn.Module:
    """``fxopt.compile(model, recipes.<recipe>(*args, **kwargs))``, lowered to ``backend`` when ``lower``."""
    import fxopt
    from fxopt import recipes
    from fxopt.recipe_args import call_recipe

    passes = call_recipe(getattr(recipes, recipe), *args, backend=backend, **kwargs)
    return fxopt.compile(ctx.models[family], passes, example_inputs=(ctx.example(family),),
                         backend=backend if lower else None)


def _static(backend: str) -> Callable[[DemoContext], nn.Module]:
    return lambda ctx: _compile(ctx, "cnn", "static_int8", ctx.calibration["cnn"], backend=backend, lower=True)


def _finetuned(ctx: DemoContext, family: str, module: nn.Module, epochs: int = 1) -> nn.Module:
    """A short fine-tune (``fxopt.finetune``) on the training set, when fxopt has it."""
    import fxopt

    if not hasattr(fxopt, "finetune"):
        return module
    x, y = ctx.train_x[family], ctx.train_y
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]
    out = fxopt.finetune(module, data, epochs=epochs)
    return (out if isinstance(out, nn.Module) else module).eval()


def _baked(module: nn.Module) -> nn.Module:
    """Masks and clusters baked into plain weights (``fp.ApplyMasks``): the deployable, savable form."""
    from fxopt import passes as fp

    fp.ApplyMasks().apply(module)
    return module


def _qat(ctx: DemoContext) -> nn.Module:
    import fxopt

    prepared = _compile(ctx, "cnn", "qat", backend="x86")
    return fxopt.lower(_finetuned(ctx, "cnn", prepared), "x86")


def _onnx_int8(ctx: DemoContext) -> nn.Module:
    return _compile(ctx, "cnn", "static_int8", ctx.calibration["cnn"], backend="onnx", lower=True)


def _openvino(ctx: DemoContext) -> nn.Module:
    import fxopt

    return fxopt.compile(ctx.models["cnn"], [], example_inputs=(ctx.example("cnn"),), backend="openvino")


_SMALL_MODEL = "at batch 1 this model is too small for the saved work to outweigh the extra steps"

ROWS: list[DemoRow] = [
    DemoRow("float", "eager", "cnn", lambda ctx: ctx.models["cnn"]),
    DemoRow("fuse", "eager", "cnn", lambda ctx: _compile(ctx, "cnn", "fuse"),
            requires=("recipes.fuse",),
            loses="fusion only saves BatchNorm/ReLU passes over memory; noise at this size"),
    DemoRow("static_int8", "x86", "cnn", _static("x86"), requires=("recipes.static_int8", "backend:x86"),
            loses=f"int8 convs pay quantize/dequantize at the float borders; {_SMALL_MODEL}"),
    DemoRow("static_int8", "qnnpack", "cnn", _static("qnnpack"), requires=("recipes.static_int8", "backend:qnnpack"),
            loses="qnnpack kernels are tuned for ARM (phones, Raspberry Pi); on an x86 CPU they run a slow path"),
    DemoRow("fp16", "eager", "cnn", lambda ctx: _compile(ctx, "cnn", "fp16"), requires=("recipes.fp16",),
            loses="this CPU has no fast fp16 convolution: weights are stored half but upcast to float32 per call"),
    DemoRow("qat", "x86", "cnn", _qat, requires=("recipes.qat", "backend:x86"),
            loses=f"same int8 kernels as static int8; {_SMALL_MODEL}"),
    DemoRow("prune 50%", "eager", "cnn",
            lambda ctx: _baked(_finetuned(ctx, "cnn", _compile(ctx, "cnn", "prune", 0.5))), requires=("recipes.prune",),
            loses="unstructured zeros shrink the compressed file, not the dense kernels' work"),
    DemoRow("channels 30%", "eager", "cnn",
            lambda ctx: _finetuned(ctx, "cnn", _compile(ctx, "cnn", "prune", 0.3, structured=True)),
            requires=("recipes.prune",), loses="removing channels costs accuracy until fine-tuned longer"),
    DemoRow("cluster 16", "eager", "cnn", lambda ctx: _baked(_compile(ctx, "cnn", "cluster", 16)),
            requires=("recipes.cluster",),
            loses="16 shared values per layer compress well on disk but run as ordinary float weights"),
    DemoRow("low_rank", "eager", "cnn", lambda ctx: _compile(ctx, "cnn", "low_rank", energy=0.95),
            requires=("recipes.low_rank",), loses="two thin layers launch twice the kernels; small layers lose"),
    DemoRow("static_int8", "onnx", "cnn", _onnx_int8, requires=("recipes.static_int8", "backend:onnx"),
            loses="ONNX Runtime's per-call overhead dominates a model this small"),
    DemoRow("float→IR", "openvino", "cnn", _openvino, requires=("backend:openvino",),
            loses="OpenVINO's per-call overhead dominates a model this small"),
    DemoRow("float", "eager", "lstm", lambda ctx: ctx.models["lstm"]),
    DemoRow("dynamic_int8", "x86", "lstm", lambda ctx: _compile(ctx, "lstm", "dynamic_int8"),
            requires=("recipes.dynamic_int8",),
            loses="activations are quantized on the fly each step; small hidden sizes do not pay for it"),
    DemoRow("fp16", "eager", "lstm", lambda ctx: _compile(ctx, "lstm", "fp16"), requires=("recipes.fp16",),
            loses="fp16 weights are converted back per call on CPUs without native fp16 GEMM: smaller, not faster"),
]


# ---- measuring -------------------------------------------------------------------------------------


def artifact_bytes(module: nn.Module, example: torch.Tensor | None = None) -> tuple[int, int, bool]:
    """(bytes on disk, zlib-compressed bytes, native) of the module's saved file.

    ``native``: written by ``fxopt.save`` in its native format (modules a backend lowered to ONNX / OpenVINO
    by that backend: ``.onnx``, ``.xml`` + ``.bin``; others ``.pt``: fxopt's int8 format or the state dict).
    Where fxopt cannot save the module yet, the size is that of ``torch.save(module)`` (a full pickle).
    """
    import fxopt
    from fxopt import meta

    suffix = {"onnx": ".onnx", "openvino": ".xml"}.get(meta.backend_of(module) or "", ".pt")
    native = True
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model{suffix}"
        try:
            fxopt.save(module, path, example_inputs=(example,) if example is not None else None)
        except Exception:  # not savable by fxopt (yet): measure the full pickle instead
            native = False
            for p in Path(tmp).iterdir():
                p.unlink()
            buf = io.BytesIO()
            torch.save(module, buf)
            path.with_suffix(".pickle").write_bytes(buf.getvalue())
        blobs = [p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()]
    raw = b"".join(blobs)
    return len(raw), len(zlib.compress(raw, 9)), native


@dataclass
class DemoResult:
    """The demo's rows (dicts), the skipped rows and the formatted table."""

    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str, str]]  # (recipe, backend, why)
    threads: int
    seconds: float
    test_images: int
    columns: list[str] = field(default_factory=lambda: [
        "model", "recipe", "backend", "test acc %", "bytes", "zlib bytes", "b1 median ms", "FPS (b32)",
        "speed-up", "why it loses"])

    def table(self, fmt: str = "simple") -> str:
        from tabulate import tabulate

        cells = []
        for r in self.rows:
            if r.get("error"):
                cells.append([r["model"], r["recipe"], r["backend"], "", "", "", "", "", "", f"failed: {r['error']}"])
                continue
            cells.append([r["model"], r["recipe"], r["backend"], f"{r['accuracy']:.2f}", f"{r['bytes']:,}",
                          f"{r['zlib_bytes']:,}" + ("" if r["native_file"] else "*"), f"{r['median_ms']:.3f}",
                          f"{r['fps']:,.0f}",
                          f"{r['speedup']:.2f}x", r["why"]])
        align = ["left"] * 3 + ["right"] * 6 + ["left"]
        return tabulate(cells, headers=self.columns, tablefmt=fmt, disable_numparse=True, colalign=align)

    def __str__(self) -> str:
        text = self.table()
        text += (f"\n(digits test set: {self.test_images} images; batch-1 latency median and FPS at batch 32, "
                 f"{self.threads} thread(s), each model's variants timed interleaved; speed-up = float median / "
                 f"median; zlib bytes = fxopt.save's file compressed, * = "
                 f"torch.save(module) where fxopt.save cannot store the module yet; total {self.seconds:.0f} s)")
        for recipe, backend, why in self.skipped:
            text += f"\nskipped {recipe} ({backend}): {why}"
        return text


def _why(row: DemoRow, acc: float, base_acc: float, speedup: float) -> str:
    reasons = []
    if speedup < 0.95:
        reasons.append(row.loses or "slower than float here")
    if acc < base_acc - 1.0:
        reasons.append(f"accuracy -{base_acc - acc:.1f} pts")
    return "; ".join(reasons)


def _context(seed: int, fast: bool = False) -> DemoContext:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_tensors(16, seed)
    cnn = train(DigitsCNN(), xtr, ytr, epochs=1 if fast else 6, seed=seed, desc="training digits CNN")
    torch.manual_seed(seed)
    seq_tr, seq_te = xtr.squeeze(1), xte.squeeze(1)
    lstm = train(DigitsLSTM(), seq_tr, ytr, epochs=1 if fast else 10, lr=2e-3, seed=seed,
                 desc="training digits LSTM")
    return DemoContext(
        models={"cnn": cnn, "lstm": lstm}, train_x={"cnn": xtr, "lstm": seq_tr}, train_y=ytr,
        test_x={"cnn": xte, "lstm": seq_te}, test_y=yte,
        calibration={"cnn": [xtr[i : i + 32] for i in range(0, 32 * 16, 32)],
                     "lstm": [seq_tr[i : i + 32] for i in range(0, 32 * 8, 32)]})


def run(threads: int | None = 1, seed: int = 0, rows: list[DemoRow] | None = None, png: str | None = None,
        fast: bool = False) -> DemoResult:
    """Train, build every available row, measure; ``png`` also writes the accuracy/size chart there.

    ``fast``: one training epoch and short timings (a smoke run: the table's shape, not its numbers).
    """
    start = time.perf_counter()
    rows = ROWS if rows is None else rows
    ctx = _context(seed, fast)
    built: list[tuple[DemoRow, nn.Module | None, str]] = []
    skipped = []
    for row in bar(rows, "building demo rows", unit="row"):
        why = row.missing()
        if why:
            skipped.append((row.recipe, row.backend, why))
            continue
        before = copy.deepcopy(ctx.models[row.family].state_dict())
        try:
            built.append((row, row.build(ctx), ""))
        except Exception as exc:  # a recipe that fails is a finding to show, not a reason to stop the demo
            built.append((row, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
        now = ctx.models[row.family].state_dict()
        assert all(torch.equal(before[k], now[k]) for k in before), f"{row.recipe} mutated the trained model"

    import fxopt

    timings: dict[tuple[str, int], Any] = {}
    for family in bar(sorted({r.family for r, m, _ in built if m is not None}), "timing", unit="model"):
        members = {str(i): m for i, (r, m, _) in enumerate(built) if r.family == family and m is not None}
        for batch, iters in ((1, 40), (32, 4)):
            x = ctx.test_x[family][:batch]
            cmp = fxopt.benchmark_many(members, (x,), rounds=2 if fast else 6, iters=2 if fast else iters,
                                       warmup=1 if fast else 5, threads=threads)
            timings.update({(k, batch): t for k, t in cmp.timings.items()})

    out_rows: list[dict[str, Any]] = []
    base: dict[str, tuple[float, float]] = {}
    for i, (row, module, error) in enumerate(built):
        entry: dict[str, Any] = {"model": row.family, "recipe": row.recipe, "backend": row.backend}
        if module is None:
            out_rows.append({**entry, "error": error})
            continue
        acc = accuracy(module, ctx.test_x[row.family], ctx.test_y)
        t1, t32 = timings[(str(i), 1)], timings[(str(i), 32)]
        base.setdefault(row.family, (t1.median_ms, acc))
        raw, packed, native = artifact_bytes(module, ctx.example(row.family))
        speedup = base[row.family][0] / t1.median_ms
        out_rows.append({**entry, "accuracy": acc, "bytes": fxopt.report(module).total_bytes or raw, "file_bytes": raw,
                         "native_file": native,
                         "zlib_bytes": packed, "median_ms": t1.median_ms, "p90_ms": t1.p90_ms, "fps": t32.fps,
                         "speedup": speedup, "why": _why(row, acc, base[row.family][1], speedup)})
    result = DemoResult(out_rows, skipped, threads or torch.get_num_threads(), time.perf_counter() - start,
                        len(ctx.test_y))
    if png:
        plot(result, png)
    return result


def plot(result: DemoResult, path: str | os.PathLike) -> Path:
    """Accuracy vs stored bytes, one point per row, point area by batch-1 latency (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        from .errors import FxoptError

        raise FxoptError("the demo chart needs matplotlib: pip install 'fxopt[plot]'") from exc
    rows = [r for r in result.rows if not r.get("error")]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    colors = {"cnn": "tab:blue", "lstm": "tab:orange"}
    slowest = max(r["median_ms"] for r in rows)
    for family in dict.fromkeys(r["model"] for r in rows):
        pts = [r for r in rows if r["model"] == family]
        ax.scatter([r["bytes"] / 1024 for r in pts], [r["accuracy"] for r in pts],
                   s=[60 + 900 * r["median_ms"] / slowest for r in pts], alpha=0.55,
                   color=colors.get(family, "tab:gray"), edgecolors="black", label=f"{family} model")
        spots: dict[tuple[float, float], list[str]] = {}  # rows within 5% size / 0.5 pts share one label
        for r in pts:
            kib, acc = r["bytes"] / 1024, r["accuracy"]
            spot = next((k for k in spots if abs(k[0] / kib - 1) < 0.05 and abs(k[1] - acc) < 0.5), (kib, acc))
            spots.setdefault(spot, []).append(f"{r['recipe']} ({r['backend']}): {r['median_ms']:.2f} ms")
        for (kib, acc), labels in spots.items():
            ax.annotate("\n".join(labels), (kib, acc), textcoords="offset points", xytext=(10, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.12)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if str(int(v))[0] in "25"
                                                                 else ""))
    ax.set_xlabel("stored size (KiB, log scale)")
    ax.set_ylabel("test accuracy on digits (%)")
    lo = min(r["accuracy"] for r in rows)
    ax.set_ylim(min(lo - 1.0, 90.0), 100.5)
    ax.set_title("fxopt demo: accuracy vs size (point area = batch-1 latency)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", markerscale=0.5)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
