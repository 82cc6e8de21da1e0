"""``fxopt.report``: what a model stores, layer by layer (dtype, parameters, zeros, unique values, bytes).

Works on any ``nn.Module``: a float model, a GraphModule from :func:`fxopt.compile`, or a lowered int8
model. Each row is one *owner* of tensors — a submodule, or an attribute on a GraphModule's root.

Where the tensors come from, per module (first rule that applies):

1. ``module.fxopt_weights()`` if the module defines it: ``{name: tensor}`` (quantized tensors allowed).
   Its submodules are then not visited; the module describes itself completely.
2. ``torch.ao.nn.quantized`` style modules whose ``weight``/``bias`` are methods (packed weights).
3. Otherwise its own parameters, persistent buffers and packed-parameter objects
   (``torch.ops.quantized.*_prepack`` results, unpacked to count them).

*Weights* are parameters, quantized tensors, packed weights, self-described tensors and tensors on a
GraphModule's root (graph constants); other buffers (BatchNorm running statistics, masks, observer
state) are *state*: counted in bytes, not in params/nonzero/unique. ``bytes`` is the stored size:
``numel * element_size``, plus for quantized tensors the qparams as torch stores them (an 8-byte
scale and an 8-byte zero point per tensor or per channel). Each shared tensor is counted once.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import math
import zlib

import torch
import torch.fx
from tabulate import tabulate
from torch.nn.utils import parametrize

from . import meta
from .tracing import as_args
from .errors import FxoptError
from .quant.nn.base import DescribesWeights

__all__ = ["Report", "report", "tensor_bytes", "unpack_packed_params", "compressed_size"]

logger = logging.getLogger(__name__)

_STATE_NAMES = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_SUB_BYTE = {torch.quint4x2: 2, torch.quint2x4: 4}  # elements per byte


def tensor_bytes(t: torch.Tensor) -> int:
    """Stored size of ``t`` in bytes (quantized tensors include their scale/zero-point storage)."""
    if t.dtype in _SUB_BYTE:
        data = -(-t.numel() // _SUB_BYTE[t.dtype])
    else:
        data = t.numel() * t.element_size()
    if t.is_quantized:
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                           torch.per_channel_affine_float_qparams):
            data += t.q_per_channel_scales().numel() * 8 + t.q_per_channel_zero_points().numel() * 8
        else:
            data += 16
    return data


def unpack_packed_params(obj: Any) -> dict[str, torch.Tensor]:
    """Weight and bias held by a ``torch.ops.quantized.*_prepack`` object (``{}`` if unknown).

    fp16-packed linear weights are returned as ``float16`` tensors so that they count 2 bytes each.
    """
    kind = obj._type().qualified_name().rsplit(".", 1)[-1]
    ops = torch.ops.quantized
    unpackers: list[Callable] = {
        "LinearPackedParamsBase": [ops.linear_unpack, ops.linear_unpack_fp16],
        "Conv2dPackedParamsBase": [ops.conv2d_unpack, ops.conv1d_unpack],
        "Conv3dPackedParamsBase": [ops.conv3d_unpack],
        "EmbeddingPackedParamsBase": [ops.embedding_bag_unpack],
    }.get(kind, [])
    for unpack in unpackers:
        try:
            out = unpack(obj)
        except Exception:  # wrong variant for this object: try the next one
            continue
        weight, bias = (out if isinstance(out, tuple) else (out, None))
        if kind == "LinearPackedParamsBase" and not weight.is_quantized:
            weight = weight.to(torch.float16)  # fp16 prepacked weights
        found = {"weight": weight}
        if isinstance(bias, torch.Tensor):
            found["bias"] = bias
        return found
    logger.warning("report: cannot unpack packed parameters of type %s; not counted", kind)
    return {}


@dataclass
class _Entry:
    name: str
    tensor: torch.Tensor
    is_weight: bool
    key: Any


def _key(t: torch.Tensor) -> Any:
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:
        ptr = 0
    if not ptr:
        return ("id", id(t))
    return (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _own_entries(module: torch.nn.Module, is_root: bool) -> tuple[list[_Entry], bool]:
    """Tensors held by ``module`` itself, and whether its submodules are covered already."""
    if isinstance(module, DescribesWeights):
        return [_Entry(n, t, True, _key(t)) for n, t in module.fxopt_weights().items()
                if isinstance(t, torch.Tensor)], True
    weight = getattr(type(module), "weight", None)
    if callable(weight) and type(module).__module__.startswith("torch.ao.nn."):
        found = {"weight": module.weight()}
        if callable(getattr(module, "bias", None)) and isinstance(module.bias(), torch.Tensor):
            found["bias"] = module.bias()
        return [_Entry(n, t, True, ("packed", id(module), n)) for n, t in found.items()], True
    entries = [_Entry(n, p, True, _key(p)) for n, p in module.named_parameters(recurse=False)]
    if parametrize.is_parametrized(module):  # masked / clustered weights: what the layer computes with
        with torch.no_grad():
            entries += [_Entry(n, getattr(module, n), True, ("parametrized", id(module), n))
                        for n in module.parametrizations.keys()]
    for n, b in module.named_buffers(recurse=False):
        if n in module._non_persistent_buffers_set:
            continue
        state = n in _STATE_NAMES or not is_root and not b.is_quantized
        entries.append(_Entry(n, b, not state, _key(b)))
    for n, value in vars(module).items():
        if isinstance(value, torch.ScriptObject) and hasattr(value, "_type"):
            for part, t in unpack_packed_params(value).items():
                entries.append(_Entry(f"{n}.{part}", t, True, ("packed", id(value), part)))
    return entries, False


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.dequantize() if t.is_quantized else t


def _first_user(gm: torch.fx.GraphModule, attr: str) -> torch.fx.Node | None:
    """The first node that consumes attribute ``attr`` (or one of the attributes under it)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and (node.target == attr or node.target.startswith(attr + ".")):
            return next(iter(node.users), node)
    return None


def _op_of_root_attr(gm: torch.fx.GraphModule, attr: str) -> str:
    """What consumes attribute ``attr`` in the graph (its first user's target)."""
    user = _first_user(gm, attr)
    if user is None:
        return "attribute"
    if user.op == "get_attr":
        return "get_attr"
    t = user.target
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)  # "quantized.linear", "aten.conv2d.default": the namespace matters
    return t if isinstance(t, str) else str(getattr(t, "__name__", None) or t)


def _island_notes(module: torch.nn.Module) -> dict[str, str]:
    return {info.qualname: f"float island: {info}" for info in meta.leaves(module)}


def _quant_island_notes(module: torch.nn.Module) -> dict[str, str]:
    """Ops left in float inside a quantized graph (``meta.float_islands``), keyed by the row they touch:
    the called module, the owner of the weights they read, or else the node's own name."""
    if not isinstance(module, torch.fx.GraphModule):
        return {}
    nodes = {n.name: n for n in module.graph.nodes}
    notes: dict[str, str] = {}
    for island in meta.float_islands(module):
        node = nodes.get(island.node)
        key = island.node
        if node is not None and node.op == "call_module":
            key = str(node.target)
        elif node is not None:
            attrs = [a.target for a in node.all_input_nodes if a.op == "get_attr"]
            if attrs:
                key = attrs[0].rsplit(".", 1)[0] if "." in attrs[0] else attrs[0]
        notes[key] = "; ".join(x for x in (notes.get(key), f"float island: {island}") if x)
    return notes


def _weight_grid_notes(module: torch.nn.Module) -> dict[str, str]:
    """Int8 layers whose weights lie on a coarser grid (``weight_bits < 8``, e.g. 4-bit QAT)."""
    notes = {}
    for name, mod in module.named_modules():
        bits = getattr(mod, "weight_bits", 8)
        if isinstance(bits, int) and bits < 8:
            notes[name] = f"int8 storage of {bits}-bit weights ({2 ** bits} levels; no {bits}-bit kernel)"
    return notes


# Sources of per-row notes: each maps a row name (or a module prefix) to a note. Rows that do not exist
# yet (weightless modules or ops) are added with zero counts.
NOTE_SOURCES: list[Callable[[torch.nn.Module], dict[str, str]]] = [_island_notes, _quant_island_notes,
                                                                    _weight_grid_notes, meta.module_notes]


class _ShapeRecorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, str] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n.name] = _shape_str(out)
        return out


def _shape_str(out: Any) -> str:
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    return ", ".join("x".join(str(d) for d in x.shape) or "scalar" for x in leaves)


def _output_shapes(module: torch.nn.Module, owners: dict[str, torch.nn.Module], example_inputs: Any):
    """Output shape per row name (module rows via hooks, GraphModule root attributes via the graph)."""
    found: dict[str, str] = {}
    handles = []
    for name, mod in owners.items():
        def hook(_m, _inp, out, name=name):
            found.setdefault(name, _shape_str(out))
        handles.append(mod.register_forward_hook(hook))
    args = as_args(example_inputs)
    node_shapes: dict[str, str] = {}
    try:
        with torch.no_grad():
            if isinstance(module, torch.fx.GraphModule):
                rec = _ShapeRecorder(module)
                rec.run(*args)
                node_shapes = rec.shapes
            else:
                module(*args)
    except Exception as exc:
        raise FxoptError(f"fxopt.report could not run {type(module).__name__} on example_inputs to record output "
                         f"shapes: {type(exc).__name__}: {exc}. Pass inputs the model accepts, or "
                         f"example_inputs=None") from exc
    finally:
        for h in handles:
            h.remove()
    return found, node_shapes


_NUMERIC = ("params", "nonzero", "sparsity", "unique", "bits/w", "bytes")


def _cell(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


@dataclass
class Report:
    """Per-layer storage report. ``str(report)`` is a table; ``rows`` are dicts with the same columns."""

    rows: list[dict[str, Any]]
    total_bytes: int
    total_params: int
    total_nonzero: int
    has_shapes: bool = False
    columns: list[str] = field(default_factory=list)
    _stored: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)
    _compressed: int | None = field(default=None, repr=False, compare=False)

    @property
    def compressed_bytes(self) -> int:
        """Size of the stored tensors after gzip (deflate level 6): what pruning and clustering save on disk
        or over the air, where dense storage gains nothing. Computed on first use."""
        if self._compressed is None:
            self._compressed = compressed_size(self._stored)
        return self._compressed

    @property
    def sparsity(self) -> float:
        """Fraction of weight values that are exactly zero (``1 - nonzero / params``)."""
        return 1.0 - self.total_nonzero / self.total_params if self.total_params else 0.0

    def _table(self, tablefmt: str) -> str:
        total = {"name": "total", "params": self.total_params, "nonzero": self.total_nonzero,
                 "bytes": self.total_bytes, "notes": f"{self.total_bytes / 2**20:.2f} MiB"}
        table = [[_cell(row.get(c, "")) for c in self.columns] for row in [*self.rows, total]]
        align = ["right" if c in _NUMERIC else "left" for c in self.columns]
        return tabulate(table, headers=self.columns, disable_numparse=True, colalign=align, tablefmt=tablefmt)

    def _summary(self) -> str:
        return (f"sparsity: {self.sparsity:.2%}, compressed (gzip): {self.compressed_bytes:,} bytes "
                f"({self.compressed_bytes / max(self.total_bytes, 1):.1%} of {self.total_bytes:,})")

    def __str__(self) -> str:
        return f"{self._table('simple')}\n{self._summary()}"

    def to_markdown(self) -> str:
        """The table as GitHub-flavoured markdown, the sparsity / compressed-size line below it."""
        return f"{self._table('github')}\n\n{self._summary()}\n"

    def to_html(self) -> str:
        """The table as an HTML fragment (``<table>`` plus a summary paragraph); cell text is escaped."""
        return f"{self._table('html')}\n<p>{html.escape(self._summary())}</p>\n"

    def __repr__(self) -> str:
        return (f"Report({len(self.rows)} rows, params={self.total_params}, "
                f"bytes={self.total_bytes}, sparsity={self.sparsity:.4f})")


def report(module: torch.nn.Module, example_inputs: Any = None) -> Report:
    """Per-layer table of what ``module`` stores: dtype, params, nonzero, unique values, bytes."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fxopt.report expects a torch.nn.Module, got {type(module).__name__}")
    is_gm = isinstance(module, torch.fx.GraphModule)
    # key -> (qualified name, tensor): the tensor is kept alive so that a freed temporary's address
    # (e.g. weights unpacked from packed params) cannot be reused by another tensor and mistaken for sharing.
    seen: dict[Any, tuple[str, torch.Tensor]] = {}
    rows: list[dict[str, Any]] = []
    owners: dict[str, torch.nn.Module] = {}
    covered: list[str] = []
    for qualname, mod in module.named_modules():
        if any(p == "" or qualname.startswith(p + ".") for p in covered):
            continue
        if qualname.rsplit(".", 1)[-1] == "parametrizations" and parametrize.is_parametrized(
                module.get_submodule(qualname.rpartition(".")[0])):
            covered.append(qualname)  # the originals and masks behind a parametrized weight: counted as the weight
            continue
        entries, whole = _own_entries(mod, is_root=(qualname == "" and is_gm))
        if whole:
            covered.append(qualname)
        if qualname == "" and is_gm:  # one row per root attribute (graph constant)
            groups = {e.name.split(".")[0]: [] for e in entries}
            for e in entries:
                groups[e.name.split(".")[0]].append(e)
            for attr, group in groups.items():
                rows.append(_row(attr, _op_of_root_attr(module, attr), group, seen))
        elif entries:
            owners[qualname] = mod
            op = type(mod).__name__
            if is_gm and type(mod) is torch.nn.Module:  # attribute holder (torch.export): name the op
                op = _op_of_root_attr(module, qualname)
            rows.append(_row(qualname or "(root)", op, entries, seen))
    _add_notes(module, rows, owners)
    has_shapes = example_inputs is not None
    if has_shapes:
        mod_shapes, node_shapes = _output_shapes(module, owners, example_inputs)
        for row in rows:
            name = "" if row["name"] == "(root)" else row["name"]
            user = _first_user(module, name) if is_gm else None
            row["output shape"] = mod_shapes.get(name) or (node_shapes.get(user.name, "") if user else "")
    columns = ["name", "op", "dtype"] + (["output shape"] if has_shapes else []) + [
        "params", "nonzero", "sparsity", "unique", "bits/w", "bytes", "notes"]
    stored = [t for _, t in seen.values()]
    return Report(rows, total_bytes=sum(r["bytes"] for r in rows), total_params=sum(r["params"] for r in rows),
                  total_nonzero=sum(r["nonzero"] for r in rows), has_shapes=has_shapes, columns=columns,
                  _stored=stored)


def _row(name: str, op: str, entries: list[_Entry], seen: dict[Any, tuple[str, torch.Tensor]]) -> dict[str, Any]:
    params = nonzero = nbytes = 0
    dtypes: list[str] = []
    notes: list[str] = []
    for e in entries:
        full = f"{name}.{e.name}" if name != "(root)" else e.name
        if e.is_weight:
            dname = str(e.tensor.dtype).replace("torch.", "")
            if dname not in dtypes:
                dtypes.append(dname)
        if e.key in seen:
            notes.append(f"{e.name} shared with {seen[e.key][0]}")
            continue
        seen[e.key] = (full, e.tensor)
        nbytes += tensor_bytes(e.tensor)
        if e.is_weight:
            params += e.tensor.numel()
            nonzero += int(torch.count_nonzero(_as_float(e.tensor)))
    unique = 0
    main = _main_weight(entries)
    if main is not None and main.numel():
        unique = int(torch.unique(_as_float(main).detach().float()).numel())
    if not dtypes:
        dtypes = sorted({str(e.tensor.dtype).replace("torch.", "") for e in entries})
    sparsity = f"{1 - nonzero / params:.1%}" if params else ""
    return {"name": name, "op": op, "dtype": "/".join(dtypes), "params": params, "nonzero": nonzero,
            "sparsity": sparsity, "unique": unique, "bits/w": _bits_per_weight(main, unique), "bytes": nbytes,
            "notes": "; ".join(notes)}


def _bits_per_weight(main: torch.Tensor | None, unique: int) -> str:
    """Bits per weight of the main weight as stored, or as a palette (index bits + the palette spread over
    the weights) when that is smaller: ``ceil(log2(unique)) + unique * element_bits / numel``."""
    if main is None or not main.numel():
        return ""
    element_bits = main.element_size() * 8
    palette = max(1, math.ceil(math.log2(max(unique, 1)))) + unique * main.element_size() * 8 / main.numel()
    return f"{min(element_bits, palette):.2f}"


def compressed_size(tensors: list[torch.Tensor], level: int = 6) -> int:
    """Size in bytes of the gzip stream of the tensors' raw bytes (quantized: int values + qparams)."""
    gz = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits=31: gzip container
    size = 0
    for t in tensors:
        t = t.detach()
        parts = [t]
        if t.is_quantized:
            parts = [t.int_repr()]
            if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                               torch.per_channel_affine_float_qparams):
                parts += [t.q_per_channel_scales().double(), t.q_per_channel_zero_points().long()]
            else:
                parts += [torch.tensor([t.q_scale()], dtype=torch.float64),
                          torch.tensor([t.q_zero_point()], dtype=torch.int64)]
        for part in parts:
            part = part.cpu().contiguous()
            size += len(gz.compress(part.reshape(-1).view(torch.uint8).numpy().tobytes()))
    return size + len(gz.flush())


def _main_weight(entries: list[_Entry]) -> torch.Tensor | None:
    """The tensor whose unique values a row shows: the one named ``weight``, else the largest weight."""
    weights = [e for e in entries if e.is_weight]
    named = [e for e in weights if e.name.rsplit(".", 1)[-1] == "weight"]
    pool = named or weights
    return max(pool, key=lambda e: e.tensor.numel()).tensor if pool else None


def _add_notes(module: torch.nn.Module, rows: list[dict[str, Any]], owners: dict[str, torch.nn.Module]) -> None:
    for source in NOTE_SOURCES:
        for prefix, note in source(module).items():
            matched = False
            for row in rows:
                if row["name"] == prefix or row["name"].startswith(prefix + "."):
                    row["notes"] = "; ".join(x for x in (row["notes"], note) if x)
                    matched = True
            if not matched:
                target = _get_submodule(module, prefix)
                if target is not None:
                    owners[prefix] = target
                rows.append({"name": prefix, "op": type(target).__name__ if target is not None else "?",
                             "dtype": "", "params": 0, "nonzero": 0, "unique": 0, "bytes": 0, "notes": note})


def _get_submodule(module: torch.nn.Module, qualname: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(qualname)
    except AttributeError:
        return None
