"""Which channels must be removed together: dependency groups over an fx graph (for ``prune-channels``).

Every output channel of a Conv/Linear gets an integer *label*. The graph is run once on example tensors,
and next to each real value the analysis carries a tensor of labels with the same shape: element
``[b, c, h, w]`` holds the label of the channel it came from. Ops that only move data (view, flatten,
permute, cat, chunk, getitem...) are applied to the label tensor itself, so channel shuffles,
concatenation offsets and flatten->linear feature blocks come out right without special cases.
Couplings are recorded as edges between labels (a networkx graph):

- an elementwise op (residual ``add``, squeeze-excitation ``mul``) couples the labels that meet at each
  position (broadcasting included);
- a consumer (Conv/Linear input, BatchNorm, LayerNorm over the last dimension, pooling) couples the labels
  that share one input channel; a GroupNorm also couples the channels of each of its groups (whole groups go);
- a depthwise conv passes its input's labels through; a grouped conv couples the same local channel of
  every group (so each group loses the same channels), on its input and on its output;
- a reshape to a literal size (``view(b, 2, c // 2, h, w)``) or a ``chunk`` keeps the pieces equal by
  coupling them position by position.

A per-channel vector read from the model (``get_attr``: ConvNeXt's ``layer_scale``, a functional
``layer_norm``'s weight) gets labels of its own and is sliced with the channels kept.
A label is *fixed* (never pruned) when it reaches a graph output, a float island (leaf module), any other
graph constant, an op the analysis does not understand, or a protected layer; every coupled label then is too,
and the reason is kept. Connected components of the label graph are the pruning units; the components
after also linking each layer's own labels are the dependency groups.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate
from torch.nn.utils import parametrize

from fxopt import meta
from fxopt.errors import FxoptError

__all__ = ["ChannelGraph", "analyse", "example_inputs_of"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                  nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.PReLU, nn.Dropout, nn.Dropout1d,
                  nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
                    nn.UpsamplingBilinear2d)
_MOVE_MODULES = (nn.Flatten, nn.Unflatten)

_UNARY_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.silu,
                    F.hardswish, F.hardsigmoid, F.gelu, F.leaky_relu, F.elu, F.mish, F.softplus, F.dropout,
                    F.dropout2d, torch.neg, torch.abs, torch.clamp, torch.clip, operator.neg, torch.exp,
                    torch.relu_, F.relu_, torch.sqrt, torch.square}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "contiguous",
                  "clone", "to", "float", "half", "double", "detach", "neg", "abs", "exp", "sqrt", "hardswish",
                  "square", "type_as"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                     operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                     torch.minimum}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_MOVE_FUNCTIONS = {torch.flatten, torch.reshape, torch.cat, torch.concat, torch.chunk, torch.split, torch.transpose,
                   torch.permute, torch.squeeze, torch.unsqueeze, operator.getitem, torch.stack, getattr,
                   torch.swapaxes, torch.movedim}
_MOVE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "chunk", "split",
                 "expand", "expand_as", "view_as", "reshape_as", "size", "dim", "repeat", "unflatten", "movedim"}
_SPATIAL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
                      F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                      F.interpolate, F.upsample}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_ELEMENTWISE_BY_NAME = {"stochastic_depth"}  # torchvision.ops (fx-wrapped): per-sample scaling


@dataclass
class Use:
    """How a layer touches channels: its input labels per position (and, for producers, its output labels)."""

    kind: str  # "conv", "depthwise", "grouped", "linear", "bn", "groupnorm", "layernorm"
    inputs: torch.Tensor  # label of every input position
    outputs: torch.Tensor | None = None  # producer labels (conv/grouped/linear)


@dataclass
class ChannelGraph:
    """Result of :func:`analyse`."""

    n_labels: int
    edges: list[tuple[int, int]]
    fixed: dict[int, str]  # label -> why it cannot be pruned
    owner: dict[int, str]  # label -> producing layer (or a description of the fixed source)
    uses: dict[str, Use]  # layer qualname -> how it uses channels
    producers: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> its output labels
    attrs: dict[str, torch.Tensor] = field(default_factory=dict)  # get_attr target -> labels of its elements
    norm_shapes: dict[str, torch.Tensor] = field(default_factory=dict)  # F.layer_norm node -> its channel labels

    def units(self) -> tuple[torch.Tensor, int]:
        """``unit[label]`` (connected components of the coupling graph) and the number of units."""
        g = nx.Graph()
        g.add_nodes_from(range(self.n_labels))
        g.add_edges_from(self.edges)
        unit = torch.empty(self.n_labels, dtype=torch.long)
        count = 0
        for count, comp in enumerate(nx.connected_components(g)):
            unit[list(comp)] = count
        return unit, count + 1

    def groups(self, unit: torch.Tensor) -> list[list[int]]:
        """Dependency groups: sets of units linked through couplings or through one layer's outputs."""
        g = nx.Graph()
        n_units = int(unit.max()) + 1 if unit.numel() else 0
        g.add_nodes_from(range(n_units))
        for labels in self.producers.values():
            units = torch.unique(unit[labels]).tolist()
            g.add_edges_from(zip(units, units[1:]))
        return [sorted(c) for c in nx.connected_components(g)]


def example_inputs_of(gm: torch.fx.GraphModule) -> list[Any]:
    """Random tensors shaped like the recorded placeholder metadata (compile's example_inputs)."""
    values = []
    gen = torch.Generator().manual_seed(0)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        tm = meta.tensor_meta(node)
        if tm is None or not hasattr(tm, "shape"):
            if node.args:  # a default value
                values.append(node.args[0])
                continue
            raise FxoptError(
                f"prune-channels needs the shapes of the model's inputs (placeholder {node.name!r} has none): "
                "pass example_inputs, e.g. fxopt.compile(model, [fp.PruneChannels(0.3)], example_inputs=(x,))")
        if tm.dtype.is_floating_point:
            values.append(torch.randn(tuple(tm.shape), generator=gen).to(tm.dtype))
        else:
            values.append(torch.zeros(tuple(tm.shape), dtype=tm.dtype))
    return values


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Drop broadcast (stride-0) dimensions so that each distinct label pattern is looked at once."""
    for d in range(t.dim()):
        if t.size(d) > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    return t


def _varies(t: torch.Tensor, dim: int) -> bool:
    t = _compact(t)
    if t.size(dim) <= 1:
        return False
    return bool((t != t.narrow(dim, 0, 1)).any())


def _literal(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Analysis:
    def __init__(self, gm: torch.fx.GraphModule, protected: dict[str, str]) -> None:
        self.gm = gm
        self.protected = protected
        self.n = 0
        self.edges: list[tuple[int, int]] = []
        self.fixed: dict[int, str] = {}
        self.owner: dict[int, str] = {}
        self.uses: dict[str, Use] = {}
        self.producers: dict[str, torch.Tensor] = {}
        self.attrs: dict[str, torch.Tensor] = {}
        self.norm_shapes: dict[str, torch.Tensor] = {}
        self.leaves = {info.qualname: info for info in meta.leaves(gm)}

    # ---- labels -----------------------------------------------------------------------------
    def new(self, count: int, owner: str, fixed: str | None = None) -> torch.Tensor:
        ids = torch.arange(self.n, self.n + count)
        self.n += count
        for i in range(self.n - count, self.n):
            self.owner[i] = owner
            if fixed:
                self.fixed[i] = fixed
        return ids

    def fixed_like(self, real: Any, owner: str, reason: str) -> Any:
        """A structure like ``real`` whose tensors all carry one new fixed label."""
        def one(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return self.new(1, owner, reason).reshape([1] * x.dim()).expand(x.shape) if x.dim() else \
                    self.new(1, owner, reason)[0]
            return x
        return map_aggregate(real, one)

    def fix(self, labels: Any, reason: str) -> None:
        for t in _tensors(labels):
            for i in torch.unique(_compact(t)).tolist():
                self.fixed.setdefault(int(i), reason)

    def couple(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Labels at the same position of ``a`` and ``b`` (after broadcasting) must go together."""
        a, b = torch.broadcast_tensors(a, b)
        a, b = _compact_pair(a, b)
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        if pairs.numel():
            self.edges.extend(map(tuple, torch.unique(pairs, dim=0).tolist()))

    def per_channel(self, labels: torch.Tensor, dim: int) -> torch.Tensor:
        """One label per position of ``dim``; labels sharing a position are coupled."""
        t = _compact(labels).movedim(dim, 0)
        t = t.expand(labels.shape[dim], *t.shape[1:]).reshape(labels.shape[dim], -1)
        first = t[:, 0]
        if t.shape[1] > 1:
            self.couple(first[:, None].expand_as(t), t)
        return first.clone()

    def couple_along(self, labels: torch.Tensor, dim: int) -> None:
        """Every slice along ``dim`` is coupled with the first one (keeps pieces of equal size)."""
        if not _varies(labels, dim):
            return
        first = labels.narrow(dim, 0, 1)
        self.couple(first.expand_as(labels), labels)

    # ---- driver ------------------------------------------------------------------------------
    def run(self, inputs: list[Any]) -> ChannelGraph:
        real: dict[torch.fx.Node, Any] = {}
        lab: dict[torch.fx.Node, Any] = {}
        inputs_iter = iter(inputs)
        last_use: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in self.gm.graph.nodes:
            for arg in node.all_input_nodes:
                last_use[arg] = node
        with torch.no_grad(), _eval_mode(self.gm):
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    value = next(inputs_iter)
                    real[node] = value
                    lab[node] = self.fixed_like(value, f"input {node.name}", "a graph input")
                    continue
                if node.op == "output":
                    self.fix(_lookup(node.args, lab), "reaches a graph output")
                    continue
                args, kwargs = _lookup(node.args, real), _lookup(node.kwargs, real)
                real[node] = _run(self.gm, node, args, kwargs)
                lab[node] = self.labels(node, real[node], lab)
                for arg in node.all_input_nodes:
                    if last_use.get(arg) is node:
                        real.pop(arg, None)
                        lab.pop(arg, None)
        return ChannelGraph(self.n, self.edges, self.fixed, self.owner, self.uses, self.producers, self.attrs,
                            self.norm_shapes)

    def labels(self, node: torch.fx.Node, out: Any, lab: dict) -> Any:
        largs, lkwargs = _lookup(node.args, lab), _lookup(node.kwargs, lab)
        if node.op == "get_attr":
            return self.attribute(str(node.target), out)
        if node.op == "call_module":
            return self.module(node, self.gm.get_submodule(node.target), out, largs, lkwargs)
        target = node.target
        if node.op == "call_method":
            name = str(target)
            if name in _UNARY_METHODS:
                return largs[0]
            if name in _BINARY_METHODS:
                return self.binary(largs[0], largs[1], out)
            if name in _MOVE_METHODS:
                return self.move(node, lambda *a, **k: getattr(a[0], "reshape" if name == "view" else name)(*a[1:], **k),
                                 out, largs, lkwargs)
            if name in _REDUCE_METHODS:
                return self.reduce(node, out, largs, lkwargs)
            if name in ("softmax", "log_softmax"):
                return self.softmax(node, largs, lkwargs)
            return self.unknown(node, out, largs, lkwargs, f"method .{name}()")
        if target in _UNARY_FUNCTIONS or getattr(target, "__name__", "") in _ELEMENTWISE_BY_NAME:
            return largs[0]
        if target in _BINARY_FUNCTIONS:
            return self.binary(largs[0], largs[1] if len(largs) > 1 else lkwargs.get("other"), out)
        if target in _MOVE_FUNCTIONS:
            return self.move(node, target, out, largs, lkwargs)
        if target in _SPATIAL_FUNCTIONS:
            return self.spatial(node, out, largs[0])
        if target in _REDUCE_FUNCTIONS:
            return self.reduce(node, out, largs, lkwargs)
        if target in (F.softmax, torch.softmax, F.log_softmax, torch.log_softmax):
            return self.softmax(node, largs, lkwargs)
        if target is F.layer_norm:
            return self.functional_layer_norm(node, out, largs, lkwargs)
        return self.unknown(node, out, largs, lkwargs, f"function {getattr(target, '__name__', target)}")

    # ---- op kinds ----------------------------------------------------------------------------
    def module(self, node: torch.fx.Node, module: nn.Module, out: Any, largs: tuple, lkwargs: dict) -> Any:
        name = str(node.target)
        if name in self.leaves:
            return self.unknown(node, out, largs, lkwargs, f"the float island {name} (untraced leaf)")
        if parametrize.is_parametrized(module) or module._forward_hooks or module._forward_pre_hooks:
            return self.unknown(node, out, largs, lkwargs,
                                f"{name}, which has parametrizations or hooks (run fp.ApplyMasks() first)")
        if isinstance(module, _UNARY_MODULES):
            return largs[0]
        if isinstance(module, _CONV) and len(largs) == 1 and not lkwargs:
            return self.conv(name, module, out, largs[0])
        if isinstance(module, nn.Linear) and len(largs) == 1 and not lkwargs:
            return self.linear(name, module, out, largs[0])
        if isinstance(module, _BN) and len(largs) == 1 and out.dim() >= 2:
            per = self.per_channel(largs[0], 1)
            self.record(name, Use("bn", per))
            return _broadcast_channels(per, out.shape, 1)
        if isinstance(module, nn.GroupNorm) and len(largs) == 1 and out.dim() >= 2:
            return self.group_norm(name, module, out, largs[0])
        if isinstance(module, nn.LayerNorm) and len(largs) == 1 and out.dim() >= 1:
            return self.layer_norm(node, module, out, largs[0])
        if isinstance(module, _SPATIAL_MODULES):
            return self.spatial(node, out, largs[0])
        if isinstance(module, _MOVE_MODULES):
            return module(largs[0])
        return self.unknown(node, out, largs, lkwargs, f"{name} ({type(module).__name__})")

    def record(self, name: str, use: Use) -> None:
        """A layer called more than once: the same weight column sees every call's labels."""
        seen = self.uses.get(name)
        if seen is None:
            self.uses[name] = use
        else:
            self.couple(seen.inputs, use.inputs)

    def outputs_of(self, name: str, count: int) -> torch.Tensor:
        if name not in self.producers:
            self.producers[name] = self.new(count, name, self.protected.get(name))
        return self.producers[name]

    def conv(self, name: str, conv: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        per = self.per_channel(x, 1)
        groups = conv.groups
        if groups == 1:
            ids = self.outputs_of(name, conv.out_channels)
            self.record(name, Use("conv", per, ids))
            return _broadcast_channels(ids, out.shape, 1)
        if groups == conv.in_channels:  # depthwise (any channel multiplier): outputs follow inputs
            outs = per.repeat_interleave(conv.out_channels // conv.in_channels)
            self.record(name, Use("depthwise", per, outs))
            return _broadcast_channels(outs, out.shape, 1)
        ids = self.outputs_of(name, conv.out_channels)
        self.couple_along(per.reshape(groups, -1), 0)  # same local input channel in every group
        self.couple_along(ids.reshape(groups, -1), 0)  # same local output channel in every group
        self.record(name, Use("grouped", per, ids))
        return _broadcast_channels(ids, out.shape, 1)

    def linear(self, name: str, linear: nn.Linear, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        per = self.per_channel(x, x.dim() - 1)
        ids = self.outputs_of(name, linear.out_features)
        self.record(name, Use("linear", per, ids))
        return _broadcast_channels(ids, out.shape, out.dim() - 1)

    def group_norm(self, name: str, norm: nn.GroupNorm, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Statistics per group of ``C / G`` channels: a group's channels are coupled, so whole groups go
        (the remaining groups normalize exactly as before) and the channel count stays divisible."""
        per = self.per_channel(x, 1)
        self.couple_along(per.reshape(norm.num_groups, -1), 1)
        self.record(name, Use("groupnorm", per))
        return _broadcast_channels(per, out.shape, 1)

    def layer_norm(self, node: torch.fx.Node, norm: nn.LayerNorm, out: torch.Tensor, x: torch.Tensor) -> Any:
        """LayerNorm over the last dimension only (``Linear -> LN -> Linear``, channels-last ConvNeXt blocks):
        its weight and bias lose the pruned channels (the statistics then run over the channels kept)."""
        if len(norm.normalized_shape) != 1:
            return self.unknown(node, out, (x,), {}, f"{node.target} (LayerNorm over {len(norm.normalized_shape)} "
                                                     "dimensions)")
        per = self.per_channel(x, x.dim() - 1)
        self.record(str(node.target), Use("layernorm", per))
        return _broadcast_channels(per, out.shape, out.dim() - 1)

    def attribute(self, target: str, value: Any) -> Any:
        """A vector stored on the model (one dimension longer than 1: ConvNeXt's ``layer_scale``, the weight of a
        functional norm) gets a label per element, coupled wherever it meets activations; it is sliced with
        the channels kept. Any other constant is fixed."""
        if isinstance(value, torch.Tensor) and value.is_floating_point() and sum(d > 1 for d in value.shape) == 1:
            ids = self.new(value.numel(), target).reshape(value.shape)
            if target in self.attrs:
                self.couple(self.attrs[target], ids)
            else:
                self.attrs[target] = ids
            return ids
        return self.fixed_like(value, target, f"combined with the model constant {target}")

    def functional_layer_norm(self, node: torch.fx.Node, out: torch.Tensor, largs: tuple, lkwargs: dict) -> Any:
        """``F.layer_norm`` over the last dimension (torchvision's ``LayerNorm2d``): like the module, and the
        literal ``normalized_shape`` in the graph follows the channels kept."""
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        if not (isinstance(shape, (tuple, list)) and len(shape) == 1 and _literal(shape[0])):
            return self.unknown(node, out, largs, lkwargs, f"{node.name} (layer_norm over several dimensions)")
        x = largs[0]
        per = self.per_channel(x, x.dim() - 1)
        for position, key in ((2, "weight"), (3, "bias")):
            param = largs[position] if len(largs) > position else lkwargs.get(key)
            if isinstance(param, torch.Tensor):
                self.couple(per, param.reshape(-1))
        self.norm_shapes[node.name] = per
        return _broadcast_channels(per, out.shape, out.dim() - 1)

    def binary(self, a: Any, b: Any, out: Any) -> Any:
        tensors = [t for t in (a, b) if isinstance(t, torch.Tensor)]
        if not isinstance(out, torch.Tensor) or not tensors:
            return out
        # a one-element constant (a scale, a bias scalar) treats every channel alike: no coupling
        tensors = [t for t in tensors if not (t.numel() == 1 and int(t.reshape(-1)[0]) in self.fixed)] or tensors
        if len(tensors) == 2:
            self.couple(*tensors)
        return torch.broadcast_tensors(*tensors)[0].expand(out.shape)

    def spatial(self, node: torch.fx.Node, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or out.dim() != x.dim() or out.shape[1] != x.shape[1]:
            return self.unknown(node, out, (x,), {}, f"{node.name} (changes the channel count)")
        per = self.per_channel(x, 1)
        return _broadcast_channels(per, out.shape, 1)

    def reduce(self, node: torch.fx.Node, out: Any, largs: tuple, lkwargs: dict) -> Any:
        x = largs[0]
        dims = largs[1] if len(largs) > 1 else lkwargs.get("dim")
        keepdim = largs[2] if len(largs) > 2 else lkwargs.get("keepdim", False)
        if dims is None or not isinstance(out, torch.Tensor):
            return self.unknown(node, out, largs, lkwargs, f"{node.name} (a full reduction)")
        dims = [d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims)]
        if any(_varies(x, d) for d in dims):
            return self.unknown(node, out, largs, lkwargs, f"{node.name} (reduces over channels)")
        return torch.amax(x, dim=dims, keepdim=keepdim).expand(out.shape) if dims else x

    def softmax(self, node: torch.fx.Node, largs: tuple, lkwargs: dict) -> Any:
        x = largs[0]
        dim = largs[1] if len(largs) > 1 else lkwargs.get("dim")
        if dim is None or _varies(x, dim % x.dim()):
            self.fix(x, f"normalized over channels by {node.name}")
        return x

    def move(self, node: torch.fx.Node, fn: Callable, out: Any, largs: tuple, lkwargs: dict) -> Any:
        """Ops that only move data: applied to the labels themselves, then the size rules."""
        name = getattr(fn, "__name__", "") if node.op != "call_method" else str(node.target)
        if fn is getattr or (node.op == "call_method" and name in ("size", "dim")):
            return out  # shapes and attributes: the real value
        if fn is operator.getitem and isinstance(largs[0], torch.Tensor):
            return self.getitem(node, out, largs[0], largs[1])
        if fn is operator.getitem:
            return largs[0][largs[1]]
        if fn in (torch.cat, torch.concat):
            labels = _cat(largs, lkwargs, out)
        else:
            labels = fn(*largs, **lkwargs)
        if name in ("view", "reshape") or fn is torch.reshape:
            raw = node.args[1:] if len(node.args) > 1 else ()
            if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
                raw = tuple(raw[0])
            for d, size in enumerate(raw):
                if _literal(size) and size != -1 and d < labels.dim():
                    self.couple_along(labels, d)  # a literal size must stay the same after pruning
        if name in ("chunk", "split") or fn in (torch.chunk, torch.split):
            pieces = list(labels)
            size_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections",
                                                                                node.kwargs.get("chunks"))
            dim = _dim_arg(node, 2, default=0) % largs[0].dim()
            if (name == "split" or fn is torch.split) and (_literal(size_arg) or isinstance(size_arg, (list, tuple))):
                if _varies(largs[0], dim):
                    self.fix(largs[0], f"split into constant sizes by {node.name}")
            elif len({p.shape[dim] for p in pieces}) > 1:
                if _varies(largs[0], dim):
                    self.fix(largs[0], f"split into unequal pieces by {node.name}")
            else:
                for p in pieces[1:]:
                    self.couple(pieces[0], p)
        return labels

    def getitem(self, node: torch.fx.Node, out: Any, x: torch.Tensor, index: Any) -> Any:
        index = index if isinstance(index, tuple) else (index,)
        dim = 0
        for item in index:
            if item is None:
                continue
            if item is Ellipsis:
                return self.unknown(node, out, (x,), {}, f"{node.name} (indexing with ...)")
            if not (isinstance(item, slice) and item == slice(None)) and dim < x.dim() and _varies(x, dim):
                self.fix(x, f"indexed at constant channel positions by {node.name}")
                break
            dim += 1
        return x[index if len(index) > 1 else index[0]]

    def unknown(self, node: torch.fx.Node, out: Any, largs: tuple, lkwargs: dict, what: str) -> Any:
        self.fix((largs, lkwargs), f"consumed by {what}")
        return self.fixed_like(out, node.name, f"produced by {what}")


def analyse(gm: torch.fx.GraphModule, protected: dict[str, str], inputs: list[Any]) -> ChannelGraph:
    """Label every channel of ``gm`` and record how layers and ops couple them (see the module docstring)."""
    return _Analysis(gm, protected).run(inputs)


# ---- small helpers ------------------------------------------------------------------------------
def _tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_aggregate(value, lambda x: found.append(x) if isinstance(x, torch.Tensor) else x)
    return found


def _lookup(value: Any, env: dict) -> Any:
    return map_aggregate(value, lambda x: env[x] if isinstance(x, torch.fx.Node) else x)


def _cat(largs: tuple, lkwargs: dict, out: torch.Tensor) -> torch.Tensor:
    """``torch.cat`` of label tensors without materialising dimensions that are broadcast in every input."""
    tensors = list(largs[0])
    dim = (largs[1] if len(largs) > 1 else lkwargs.get("dim", 0)) % out.dim()
    for d in range(out.dim()):
        if d != dim and out.size(d) > 1 and all(t.stride(d) == 0 for t in tensors):
            tensors = [t.narrow(d, 0, 1) for t in tensors]
    return torch.cat(tensors, dim).expand(out.shape)


def _compact_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for d in range(a.dim()):
        if a.size(d) > 1 and a.stride(d) == 0 and b.stride(d) == 0:
            a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
    return a, b


def _broadcast_channels(per: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = per.numel()
    return per.reshape(view).expand(shape)


def _dim_arg(node: torch.fx.Node, position: int, default: int) -> int:
    value = node.args[position] if len(node.args) > position else node.kwargs.get("dim", default)
    return value if isinstance(value, int) else default


def _run(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


class _eval_mode:
    """Run the example forward in eval mode (no BatchNorm statistics update), then restore the flags."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags:
            m.training = flag
