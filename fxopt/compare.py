"""``fxopt.compare``: how far a candidate model's numbers are from a reference's, per output and per layer.

SQNR is ``10 * log10(sum(ref**2) / sum((ref - cand)**2))`` in dB (``inf`` when equal), accumulated
over all batches. Layers are matched by qualified module name (a GraphModule's ``call_module`` targets
are module names too); a layer is compared when both models produced outputs of the same shape there.
Quantized and half-precision outputs are dequantized / widened to float64 before comparing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from tabulate import tabulate

from .errors import FxoptError
from .layer_groups import run_recording_groups, sequential_group_ends

__all__ = ["Comparison", "compare", "sqnr_db"]


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``candidate`` against ``reference``, in dB."""
    acc = _Acc()
    acc.add(reference, candidate)
    return acc.sqnr_db


def _to_float(t: torch.Tensor) -> torch.Tensor:
    if t.is_quantized:
        t = t.dequantize()
    return t.detach().to(torch.float64)


@dataclass
class _Acc:
    """Running sums for one compared tensor position."""

    shape: tuple = ()
    signal: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0
    top1_same: int = 0
    top1_total: int = 0
    batches: int = 0

    def add(self, ref: torch.Tensor, cand: torch.Tensor) -> None:
        r, c = _to_float(ref), _to_float(cand)
        self.shape = tuple(ref.shape)
        diff = r - c
        self.signal += float((r * r).sum())
        self.noise += float((diff * diff).sum())
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))
        if r.dim() == 2 and r.shape[1] > 1 and (ref.is_floating_point() or ref.is_quantized):
            self.top1_same += int((r.argmax(dim=1) == c.argmax(dim=1)).sum())
            self.top1_total += r.shape[0]
        self.batches += 1

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def top1(self) -> float | None:
        return self.top1_same / self.top1_total if self.top1_total else None


@dataclass
class Comparison:
    """Result of :func:`compare`. ``outputs`` and ``layers`` hold one dict per compared tensor."""

    outputs: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    batches: int
    columns: list[str] = field(default_factory=lambda: ["name", "shape", "sqnr_db", "max_abs_error", "top1"])

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.outputs + self.layers

    @property
    def sqnr_db(self) -> float:
        """Worst whole-output SQNR over all outputs."""
        return min((r["sqnr_db"] for r in self.outputs), default=math.inf)

    @property
    def max_abs_error(self) -> float:
        return max((r["max_abs_error"] for r in self.outputs), default=0.0)

    @property
    def top1_agreement(self) -> float | None:
        """Fraction of rows whose argmax agrees, over 2-D outputs (worst output); None if there are none."""
        values = [r["top1"] for r in self.outputs if r["top1"] is not None]
        return min(values) if values else None

    @property
    def worst_layer(self) -> dict[str, Any] | None:
        return min(self.layers, key=lambda r: r["sqnr_db"], default=None)

    def _table(self, tablefmt: str) -> str:
        def fmt(row: dict[str, Any]) -> list[Any]:
            top1 = "" if row["top1"] is None else f"{row['top1']:.2%}"
            return [row["name"], row["shape"], f"{row['sqnr_db']:.2f}", f"{row['max_abs_error']:.3g}", top1]

        table = [fmt(r) for r in self.outputs]
        if self.layers:
            table.append(["-- layers --", "", "", "", ""])
            table.extend(fmt(r) for r in self.layers)
        return tabulate(table, headers=self.columns, disable_numparse=True, tablefmt=tablefmt)

    def __str__(self) -> str:
        return self._table("simple")

    def to_markdown(self) -> str:
        """The table as GitHub-flavoured markdown."""
        return self._table("github") + "\n"

    def to_html(self) -> str:
        """The table as an HTML fragment (``<table>``); cell text is escaped."""
        return self._table("html") + "\n"

    def plot_sqnr(self, path: str | os.PathLike, *, title: str | None = None, top: int | None = 60) -> Path:
        """A bar chart of per-layer SQNR (dB) in model order, written as PNG to ``path`` (needs matplotlib).

        Low bars are where quantization hurts; the worst layer is highlighted and the whole-output SQNR
        is drawn as a line. ``top`` keeps that many lowest-SQNR layers (in model order) on big models.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise FxoptError("Comparison.plot_sqnr needs matplotlib: pip install 'fxopt[plot]'") from exc
        if not self.layers:
            raise FxoptError("no per-layer results to plot: the two models share no layer names "
                             "(compare an int8 model with the float model after the same fusion)")
        layers = [r for r in self.layers if math.isfinite(r["sqnr_db"])] or self.layers
        if top is not None and len(layers) > top:
            keep = {id(r) for r in sorted(layers, key=lambda r: r["sqnr_db"])[:top]}
            layers = [r for r in layers if id(r) in keep]
        values = [min(r["sqnr_db"], 99.0) if math.isfinite(r["sqnr_db"]) else 99.0 for r in layers]
        worst = min(range(len(values)), key=values.__getitem__)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers) + 2.0), 4.8), dpi=110)
        colors = ["tab:red" if i == worst else "tab:blue" for i in range(len(values))]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([r["name"] for r in layers], rotation=90, fontsize=7)
        ax.set_xlabel("layer (model order)")
        ax.set_ylabel("SQNR vs reference (dB, higher is better)")
        if math.isfinite(self.sqnr_db):
            ax.axhline(self.sqnr_db, color="black", linestyle="--", linewidth=1,
                       label=f"whole output: {self.sqnr_db:.1f} dB")
            ax.legend(loc="upper right")
        ax.set_title(title or f"per-layer SQNR (worst: {layers[worst]['name']}, {values[worst]:.1f} dB)")
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out)
        plt.close(fig)
        return out

    def __repr__(self) -> str:
        return (f"Comparison(sqnr_db={self.sqnr_db:.2f}, max_abs_error={self.max_abs_error:.3g}, "
                f"top1_agreement={self.top1_agreement}, layers={len(self.layers)}, batches={self.batches})")


def _batches(inputs: Any) -> list[tuple[tuple, dict]]:
    """``inputs`` as a list of (args, kwargs): a tensor, a tuple of positional inputs, a dict of keyword
    inputs, or a list of those (one per batch)."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise FxoptError("fxopt.compare got an empty list of inputs; pass at least one batch")
    out = []
    for item in items:
        if isinstance(item, dict):
            out.append(((), item))
        elif isinstance(item, tuple):
            out.append((item, {}))
        elif isinstance(item, torch.Tensor):
            out.append(((item,), {}))
        else:
            raise FxoptError(
                f"fxopt.compare inputs must be a tensor, a tuple of positional inputs, a dict of keyword inputs "
                f"or a list of those (one per batch); got {type(item).__name__}")
    return out


def _tensor_leaves(out: Any) -> list[tuple[str, torch.Tensor]]:
    flat, _ = pytree.tree_flatten_with_path(out)
    return [(pytree.keystr(path), leaf) for path, leaf in flat if isinstance(leaf, torch.Tensor)]


def _snapshot(out: Any) -> Any:
    # Clone: the model may modify a layer's output in place afterwards (``out += identity``).
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, out)


def _wrapper_prefix(model: torch.nn.Module) -> str:
    """``"child."`` when ``model`` only wraps one child (e.g. a lowered int8 model around its graph), else ``""``.

    Layer names are then taken relative to that child, so they line up with the reference's.
    """
    children = list(model.named_children())
    if len(children) == 1 and not list(model.parameters(recurse=False)) and not list(model.buffers(recurse=False)):
        return children[0][0] + "."
    return ""


def _graph_of(model: torch.nn.Module) -> torch.fx.GraphModule | None:
    """The graph to read layer groups from: the model's own, a lowered model's, or a symbolic trace."""
    inner = getattr(model, "graph_module", None)
    if isinstance(inner, torch.fx.GraphModule) and _wrapper_prefix(model):
        return inner
    if isinstance(model, torch.fx.GraphModule):
        return model
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # untraceable models are compared layer by layer with hooks
        return None


def _run_layers(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Any, dict[str, list[Any]]]:
    """Output and per-layer values: at the end of each layer's fused group when the model has a graph
    (:mod:`fxopt.layer_groups`), else each module's own output."""
    gm = _graph_of(model)
    if gm is not None:
        try:
            if gm is not model and getattr(model, "engine", None):  # a lowered int8 model runs under its engine
                previous = torch.backends.quantized.engine
                torch.backends.quantized.engine = model.engine
                try:
                    return run_recording_groups(gm, args, kwargs, _snapshot)
                finally:
                    torch.backends.quantized.engine = previous
            return run_recording_groups(gm, args, kwargs, _snapshot)
        except Exception:  # e.g. a trace that does not run on these inputs: fall back to hooks
            pass
    return _run_with_hooks(model, args, kwargs)


def _run_with_hooks(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Any, dict[str, list[Any]]]:
    seen: dict[str, list[Any]] = {}
    handles = []
    prefix = _wrapper_prefix(model)
    # A conv's value is read at the end of its Sequential group (conv -> BatchNorm -> ReLU), like in a graph.
    groups = sequential_group_ends(model)
    for name, mod in model.named_modules():
        record_as = groups.get(name, name)
        if record_as is not None and record_as.startswith(prefix) and len(record_as) > len(prefix):
            record_as = record_as[len(prefix):]
            handles.append(mod.register_forward_hook(
                lambda _m, _i, out, name=record_as: seen.setdefault(name, []).append(_snapshot(out))))
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def compare(reference: torch.nn.Module, candidate: torch.nn.Module, inputs: Any) -> Comparison:
    """Compare ``candidate`` against ``reference`` on ``inputs``: per output and per matching layer.

    Layers match by qualified name, each read at the end of its fused group (:mod:`fxopt.layer_groups`):
    a conv with BatchNorm folded in and ReLU fused (``relu(bn(conv(x)))`` under the conv's name) is compared
    with the original's value after its BatchNorm and ReLU, so the original float model can be the reference.
    """
    for label, m in (("reference", reference), ("candidate", candidate)):
        if not callable(m):
            raise TypeError(f"fxopt.compare: {label} must be a module (or callable), got {type(m).__name__}")
    out_accs: dict[str, _Acc] = {}
    layer_accs: dict[str, _Acc] = {}
    batches = _batches(inputs)
    for args, kwargs in batches:
        ref_out, ref_layers = _run_layers(reference, args, kwargs)
        cand_out, cand_layers = _run_layers(candidate, args, kwargs)
        ref_leaves, cand_leaves = _tensor_leaves(ref_out), _tensor_leaves(cand_out)
        if len(ref_leaves) != len(cand_leaves):
            raise FxoptError(
                f"fxopt.compare: the reference returns {len(ref_leaves)} tensors but the candidate returns "
                f"{len(cand_leaves)}; compare models with the same output structure")
        for (path, r), (_, c) in zip(ref_leaves, cand_leaves):
            if r.shape != c.shape:
                raise FxoptError(f"fxopt.compare: output{path} has shape {tuple(r.shape)} in the reference but "
                                 f"{tuple(c.shape)} in the candidate")
            out_accs.setdefault(f"output{path}", _Acc()).add(r, c)
        for name, ref_calls in ref_layers.items():
            cand_calls = cand_layers.get(name)
            if cand_calls is None or len(cand_calls) != len(ref_calls):
                continue
            for call, (r_out, c_out) in enumerate(zip(ref_calls, cand_calls)):
                r_l, c_l = _tensor_leaves(r_out), _tensor_leaves(c_out)
                if len(r_l) != len(c_l):
                    continue
                for (path, r), (_, c) in zip(r_l, c_l):
                    if r.shape == c.shape:
                        key = name + (f"#{call}" if len(ref_calls) > 1 else "") + path
                        layer_accs.setdefault(key, _Acc()).add(r, c)
    return Comparison(outputs=[_row(k, a) for k, a in out_accs.items()],
                      layers=[_row(k, a) for k, a in layer_accs.items()], batches=len(batches))


def _row(name: str, acc: _Acc) -> dict[str, Any]:
    return {"name": name, "shape": "x".join(map(str, acc.shape)), "sqnr_db": acc.sqnr_db,
            "max_abs_error": acc.max_abs, "top1": acc.top1}
