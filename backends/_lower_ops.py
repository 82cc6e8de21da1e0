"""The node-by-node walk of :func:`fxopt.backends.lowering.lower_int8`.

One :class:`OpLowering` copies a prepared graph into a new one. For every old node it knows the new
value (``env``), whether that value is a quantized tensor (``quantized``) and the qparams the value has
or will have once quantized (``qparams``). ``qvalue``/``fvalue`` hand out the quantized / float form of
a value, inserting ``quantize_per_tensor`` / ``dequantize`` once per value where needed.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt import meta
from fxopt.errors import UnsupportedError
from fxopt.graph_utils import bind_args, get_attr_path, is_observer, single_user, unique_name
from fxopt.quant.nn import FusedModule
from fxopt.quant.nn import int8 as qm
from fxopt.quant.observers import make_observer
from fxopt.quant.spec import QSpec, fused_activation_qparams
from fxopt.quant.stubs import DeQuantStub, QuantStub
from fxopt.quant.weight_sim import is_depthwise

from .spec import SHAPE_READERS, BackendSpec, OpRule, op_key

logger = logging.getLogger(__name__)

_CONV_KEYS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_ACTIVATION_KEYS = {"relu": "relu", "relu6": "relu6", "hardtanh": "relu6"}


class _KeepFloat(Exception):
    """This compute op stays float; the message is the reason."""


def _bind(fn: Callable, node: torch.fx.Node) -> dict[str, Any]:
    try:
        return bind_args(fn, node)
    except TypeError as exc:
        raise _KeepFloat(str(exc)) from exc


class OpLowering:
    def __init__(self, gm: torch.fx.GraphModule, spec: BackendSpec) -> None:
        self.gm, self.spec = gm, spec
        self.config = meta.quant_config(gm)
        self.act_spec = spec.activation
        if self.config is not None and self.config.backend == spec.name:
            self.act_spec = self.config.activation_spec
        self.modules = dict(gm.named_modules())
        self.graph = torch.fx.Graph()
        self.graph.set_codegen(gm.graph._codegen)  # torch.export's pytree codegen: the output keeps its type
        self.root: dict[str, Any] = {}
        self.env: dict[torch.fx.Node, Any] = {}
        self.quantized: set[torch.fx.Node] = set()
        self.qparams: dict[torch.fx.Node, tuple[float, int]] = {}
        self.absorbed: set[torch.fx.Node] = set()
        self._qcache: dict[torch.fx.Node, torch.fx.Node] = {}
        self._fcache: dict[torch.fx.Node, torch.fx.Node] = {}
        self.islands: list[meta.FloatIsland] = []
        self.stats: dict[str, int] = {}
        self._grid_bits: int | None = None  # weight grid of the QAT layer being lowered

    # ---- values -----------------------------------------------------------------------------
    def qvalue(self, node: torch.fx.Node) -> torch.fx.Node:
        if node in self.quantized:
            return self.env[node]
        if node not in self._qcache:
            if node not in self.qparams:
                raise _KeepFloat(f"input {node.name} is float with no observer to quantize it")
            scale, zero_point = self.qparams[node]
            self._qcache[node] = self.graph.call_function(
                torch.quantize_per_tensor, (self.env[node], scale, zero_point, self.act_spec.dtype))
        return self._qcache[node]

    def fvalue(self, node: torch.fx.Node) -> Any:
        if node not in self.quantized:
            return self.env[node]
        if node not in self._fcache:
            self._fcache[node] = self.graph.call_method("dequantize", (self.env[node],))
        return self._fcache[node]

    def _set(self, node, value, quantized: bool, qparams: tuple[float, int] | None) -> None:
        self.env[node] = value
        if quantized:
            self.quantized.add(node)
        if qparams is not None:
            self.qparams[node] = qparams

    def _copy(self, node: torch.fx.Node, mapper: Callable) -> torch.fx.Node:
        new = self.graph.node_copy(node, mapper)
        if node.op in ("call_module", "get_attr"):
            obj = self.modules.get(node.target) if node.op == "call_module" else get_attr_path(self.gm, node.target)
            if node.target in self.root and self.root[node.target] is not obj:  # name taken by an int8 module
                new.target = self._module_name(node.target)
            self.root[new.target] = obj
        return new

    def _module_name(self, base: str) -> str:
        return unique_name(base, self.root.__contains__)

    def _emit_module(self, base: str, module: nn.Module, args: tuple) -> torch.fx.Node:
        name = self._module_name(base)
        self.root[name] = module
        return self.graph.call_module(name, args)

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    # ---- the walk -----------------------------------------------------------------------------
    def run(self) -> tuple[torch.fx.Graph, dict[str, Any]]:
        for node in self.gm.graph.nodes:
            if node in self.absorbed:
                src = node.args[0]
                self._set(node, self.env[src], src in self.quantized, self.qparams.get(src))
                continue
            self._visit(node)
        return self.graph, self.root

    def sources(self) -> dict[str, str]:
        """Old node name -> the new node holding its value as int8 readers see it (``fxopt.meta.lowered_from``)."""
        found = {}
        for old, value in self.env.items():
            value = self._qcache.get(old, value)
            if isinstance(value, torch.fx.Node) and value.graph is self.graph:
                found[old.name] = value.name
        return found

    def _visit(self, node: torch.fx.Node) -> None:
        if node.op == "output":
            self.graph.output(torch.fx.map_arg(node.args[0], self.fvalue))
            return
        if node.op in ("placeholder", "get_attr"):
            self._set(node, self._copy(node, lambda n: self.env[n]), False, None)
            return
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, QuantStub):
            obs = self._observer_of(node)
            self._set(node, self.fvalue(node.args[0]), False, self._observer_qparams(obs))
            return
        if isinstance(module, DeQuantStub):
            self._set(node, self.fvalue(node.args[0]), False, None)
            return
        if module is not None and (is_observer(module) or getattr(module, "fxopt_lowered_as_identity", False)):
            src = node.args[0]
            qparams = self.qparams.get(src)
            if qparams is None and src not in self.quantized and module.calibrated:
                qparams = self._observer_qparams(node)  # a compute op kept float: int8 readers quantize lazily
            self._set(node, self.env[src], src in self.quantized, qparams)
            return
        key = op_key(node, self.gm)
        rule = self.spec.rule(key)
        if rule is not None and rule.kind == "weight_only":
            self._weight_only(node, key, module)
        elif rule is None or meta.quant_region(node) is None:
            self._float(node, key)
        elif rule.kind == "compute":
            self._compute(node, key, rule, module)
        elif rule.kind == "fixed":
            self._share(node, key, fixed=rule.fixed_qparams)
        else:
            self._share(node, key)

    def _float(self, node: torch.fx.Node, key: str | None) -> None:
        mapper = (lambda n: self.env[n]) if key in SHAPE_READERS or node.target is getattr else self.fvalue
        self._set(node, self._copy(node, mapper), False, None)

    # ---- share / fixed ------------------------------------------------------------------------
    def _share(self, node: torch.fx.Node, key: str, fixed: tuple[float, int] | None = None) -> None:
        src = next((a for a in node.all_input_nodes), None)
        if src is None:
            self._float(node, key)
            return
        qparams = fixed if fixed is not None else self.qparams.get(src)
        if key == "identity" and node.op != "call_module" and not _dropout_in_training(node):
            self._set(node, self.env[src], src in self.quantized, qparams)
            return
        if src not in self.quantized or (key == "pad" and not _quantized_pad_ok(node)):
            self._set(node, self._copy(node, self.fvalue), False, qparams)
            return
        stride = _unit_max_pool_stride(node, self.modules) if key == "max_pool2d" else None
        if stride is not None:  # a 1x1 max pool only subsamples (QNNPACK rejects it at run time): a strided view
            index = (Ellipsis, slice(None, None, stride[0]), slice(None, None, stride[1]))
            self._set(node, self.graph.call_function(operator.getitem, (self.env[src], index)), True, qparams)
            return
        self._set(node, self._copy(node, lambda n: self.env[n]), True, qparams)

    # ---- weight-only ----------------------------------------------------------------------------
    def _weight_only(self, node: torch.fx.Node, key: str, module: nn.Module | None) -> None:
        """Embeddings: int8 rows, float in / float out (the dynamic-quant modules of fxopt.quant.nn.dynamic)."""
        from fxopt.quant.nn.dynamic import DynamicEmbedding, DynamicEmbeddingBag  # noqa: PLC0415

        cls = {nn.Embedding: DynamicEmbedding, nn.EmbeddingBag: DynamicEmbeddingBag}.get(type(module))
        if cls is None or module.max_norm is not None:
            self._float(node, key)
            return
        qmod = cls.from_float(module)
        new = self._emit_module(node.target, qmod, ())
        new.args = torch.fx.map_arg(node.args, self.fvalue)
        new.kwargs = torch.fx.map_arg(node.kwargs, self.fvalue)
        self._set(node, new, False, None)
        self._count(key)

    # ---- compute ------------------------------------------------------------------------------
    def _compute(self, node: torch.fx.Node, key: str, rule: OpRule, module: nn.Module | None) -> None:
        obs = self._observer_of(node)
        out_qparams = self._observer_qparams(obs)
        try:
            self._check_ranges(node, key)
            activation = _fused_activation(node, module)
            follower = self._absorbable_activation(obs) if activation is None else None
            act = activation or follower
            qparams = fused_activation_qparams(self.act_spec, out_qparams, act)
            # relu6 runs as the relu kernel with the output range clamped to [0, 6]
            relu = act is not None and "relu" in rule.fused_activations
            self._grid_bits = None
            value = self._build(node, key, module, qparams, relu)
        except _KeepFloat as why:
            self.islands.append(meta.FloatIsland(node.name, key, str(why)))
            logger.info("int8 lowering keeps %s (%s) float: %s", node.name, key, why)
            self._set(node, self._copy(node, self.fvalue), False, out_qparams)
            self._count("float")
            return
        if self._grid_bits is not None and self._grid_bits < 8 and value.op == "call_module":
            self.root[value.target].weight_bits = self._grid_bits  # int8 storage, coarser grid (for the report)
            self._count(f"weights_on_{self._grid_bits}bit_grid")
        if follower is not None:
            self.absorbed.add(single_user(obs))
        self._set(node, value, True, qparams)
        self._count(key)

    def _build(self, node, key, module, qparams, relu) -> torch.fx.Node:
        engine = self.spec.engine
        if key in _CONV_KEYS:
            return self._conv(node, key, module, qparams, relu)
        if key == "linear":
            if node.op == "call_module":
                linear, wq = self._layer_and_weight_qparams(module, key)
                x = node.args[0]
            else:
                args = _bind(F.linear, node)
                linear = _functional_params(self.gm, args["weight"], args["bias"])
                x = args["input"]
                wq = self._weight_qparams(linear.weight, key)
            qmod = qm.QLinear.from_float(linear, wq, qparams, relu=relu, engine=engine)
            return self._emit_module(_base(node), qmod, (self.qvalue(x),))
        if key in ("add", "mul"):
            a, b = _binary_inputs(node)
            cls = qm.QAdd if key == "add" else qm.QMul
            return self._emit_module(_base(node), cls(*qparams, relu=relu), (self.qvalue(a), self.qvalue(b)))
        if key == "cat":
            tensors, dim = _cat_inputs(node)
            return self._emit_module(_base(node), qm.QCat(dim, *qparams), tuple(self.qvalue(t) for t in tensors))
        if key == "hardswish":
            return self._emit_module(_base(node), qm.QHardswish(*qparams), (self.qvalue(node.args[0]),))
        if node.op != "call_module":
            raise _KeepFloat(f"functional {key} has no int8 lowering (use the module form)")
        if key == "layer_norm":
            qmod: nn.Module = qm.QLayerNorm.from_float(module, qparams)
        elif key in ("batch_norm2d", "batch_norm3d"):
            qmod = qm.QBatchNorm.from_float(module, qparams)
        else:
            raise _KeepFloat(f"no int8 lowering for {key}")
        return self._emit_module(_base(node), qmod, (self.qvalue(node.args[0]),))

    def _conv(self, node, key, module, qparams, relu) -> torch.fx.Node:
        dim = _CONV_KEYS[key]
        if node.op == "call_module":
            conv, wq = self._layer_and_weight_qparams(module, key)
            x = node.args[0]
            padding, mode = conv.padding, conv.padding_mode
        else:
            args = _bind(next(f for f, d in _CONV_FUNCS.items() if d == dim), node)
            conv = _functional_params(self.gm, args["weight"], args["bias"], args["stride"], args["padding"],
                                      args["dilation"], args["groups"], dim)
            x, padding, mode = args["input"], conv.padding, "zeros"
            wq = self._weight_qparams(conv.weight, key, conv.groups)
        pads = _explicit_padding(padding, conv, dim)
        if mode != "zeros" and mode != "reflect":
            raise _KeepFloat(f"padding_mode={mode!r} has no int8 kernel")
        if mode == "zeros":
            x, pads = self._fold_pad(x, pads, dim)
        qx = self.qvalue(x)
        if mode == "reflect":
            flat = [p for lr in reversed(pads) for p in lr]
            qx = self.graph.call_function(F.pad, (qx, flat), {"mode": "reflect"})
            pads = [(0, 0)] * dim
        sym = [min(lo, hi) for lo, hi in pads]
        extra = [(lo - s, hi - s) for (lo, hi), s in zip(pads, sym)]
        if any(lo or hi for lo, hi in extra):  # asymmetric: pad explicitly (zero point = exact 0.0)
            qx = self.graph.call_function(F.pad, (qx, [p for lr in reversed(extra) for p in lr]))
        qmod = qm.QConv.from_float(conv, wq, qparams, relu=relu, padding=sym, engine=self._conv_engine(conv, dim, x))
        return self._emit_module(_base(node), qmod, (qx,))

    def _fold_pad(self, x: torch.fx.Node, pads: list[tuple[int, int]], dim: int):
        """Fold a constant-zero ``F.pad`` feeding only this conv into the conv's padding."""
        if not (x.op == "call_function" and x.target is F.pad and single_user(x) is not None):
            return x, pads
        args = _bind(F.pad, x)
        flat = list(args["pad"])
        if args["mode"] != "constant" or args["value"] not in (None, 0, 0.0) or len(flat) > 2 * dim:
            return x, pads
        pads = list(pads)
        for i in range(len(flat) // 2):  # F.pad lists the last dim first
            lo, hi = pads[dim - 1 - i]
            pads[dim - 1 - i] = (lo + flat[2 * i], hi + flat[2 * i + 1])
        if any(lo < 0 or hi < 0 for lo, hi in pads):
            return x, pads
        dead = self.env.get(x)
        if isinstance(dead, torch.fx.Node) and not dead.users:  # the copied pad now feeds nothing
            self.graph.erase_node(dead)
        self._count("pad_folded")
        return args["input"], pads

    # ---- helpers ------------------------------------------------------------------------------
    def _layer_and_weight_qparams(self, module: nn.Module, key: str):
        """The float layer to lower and its weight qparams.

        A QAT module (``fxopt_lowering()``) hands over its folded, on-grid weights with the qparams its
        fake quantizer trained with; weight grids under 8 bits are recorded for the report.
        """
        lowering = getattr(module, "fxopt_lowering", None)
        if callable(lowering):
            layer, wq = lowering()
            self._grid_bits = int(getattr(module, "grid_bits", 8))
            return layer, wq
        layer = module.inner if isinstance(module, FusedModule) else module
        return layer, self._weight_qparams(layer.weight, key, getattr(layer, "groups", 1))

    def _weight_qparams(self, weight: torch.Tensor, key: str, groups: int = 1):
        rule = self.spec.rule(key)
        per_channel = bool(rule and rule.per_channel) and (self.config is None or self.config.per_channel)
        return weight_qparams(weight, per_channel, self.spec, self.config, is_depthwise(weight, groups))

    def _conv_engine(self, conv: nn.Module, dim: int, x: torch.fx.Node | None = None) -> str:
        """The engine to pack ``conv``'s weights under (a backend may pick a faster library per conv and input)."""
        return self.spec.engine

    def _observer_of(self, node: torch.fx.Node) -> torch.fx.Node:
        for user in node.users:
            if user.op == "call_module" and is_observer(self.modules.get(user.target)):
                return user
        raise UnsupportedError(
            f"int8 node {node.name} has no observer after it: run fxopt.passes.PlaceObservers() and "
            "Calibrate(data) after InsertQuantStubs, before lowering"
        )

    def _observer_qparams(self, obs: torch.fx.Node) -> tuple[float, int]:
        scale, zero_point = self.modules[obs.target].calculate_qparams()
        return float(torch.as_tensor(scale).reshape(-1)[0]), int(torch.as_tensor(zero_point).reshape(-1)[0])

    def _range(self, qparams: tuple[float, int]) -> tuple[float, float]:
        scale, zero_point = qparams
        return (self.act_spec.qmin - zero_point) * scale, (self.act_spec.qmax - zero_point) * scale

    def _check_ranges(self, node: torch.fx.Node, key: str) -> None:
        if key not in ("add", "cat"):
            return
        inputs = _cat_inputs(node)[0] if key == "cat" else _binary_inputs(node)
        widths = []
        for src in inputs:
            if src not in self.qparams:
                return
            lo, hi = self._range(self.qparams[src])
            widths.append(hi - lo)
        if len(widths) > 1 and min(widths) > 0:
            ratio = max(widths) / min(widths)
            if ratio > self.spec.max_range_ratio:
                raise _KeepFloat(
                    f"input ranges differ by {ratio:.0f}x (> max_range_ratio={self.spec.max_range_ratio:g}); one "
                    "int8 scale would wipe out the small input, so this op stays float")

    def _absorbable_activation(self, obs: torch.fx.Node) -> str | None:
        """``relu``/``relu6`` when the observed value's only reader is such an activation in the region."""
        user = single_user(obs)
        if user is None or meta.quant_region(user) is None or not user.args or user.args[0] is not obs:
            return None
        act = _ACTIVATION_KEYS.get(op_key(user, self.gm))
        if act is None or (op_key(user, self.gm) == "hardtanh" and _hardtanh_bounds(user, self.modules) != (0, 6)):
            return None
        return act


def weight_spec(spec: BackendSpec, config: Any, per_channel: bool, depthwise: bool = False) -> tuple[QSpec, str]:
    """The weight qspec (and weight observer kind): the backend's, what PlaceObservers chose, or the backend's
    depthwise one (``BackendSpec.depthwise_weight``) for depthwise convs."""
    wspec: QSpec = spec.weight
    kind = "minmax"
    if config is not None and config.backend == spec.name:
        wspec, kind = config.weight_spec, config.weight
    if depthwise and spec.depthwise_weight is not None:
        wspec = spec.depthwise_weight
    return wspec.with_axis(0 if per_channel else None), kind



def weight_qparams(weight: torch.Tensor, per_channel: bool, spec: BackendSpec, config: Any, depthwise: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ``weight`` (per output channel when ``per_channel``), from the weight observer
    the graph was prepared with (``meta.quant_config``), else min/max of the spec's weight qspec."""
    wspec, kind = weight_spec(spec, config, per_channel, depthwise)
    observer = make_observer(kind, wspec)
    observer(weight.detach().float())
    scale, zero_point = observer.calculate_qparams()
    return torch.as_tensor(scale).reshape(-1), torch.as_tensor(zero_point).reshape(-1)


def _fused_activation(node: torch.fx.Node, module: nn.Module | None) -> str | None:
    """The activation a fused module applies (fusion metadata; the module's declared kind if that is missing)."""
    if not isinstance(module, FusedModule):
        return None
    return meta.fused_activation(node) or module.activation_kind


def _hardtanh_bounds(node: torch.fx.Node, modules: dict) -> tuple[float, float] | None:
    if node.op == "call_module":
        mod = modules[node.target]
        return float(mod.min_val), float(mod.max_val)
    if node.target is F.hardtanh:
        args = _bind(F.hardtanh, node)
        return float(args["min_val"]), float(args["max_val"])
    return None


def _unit_max_pool_stride(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[int, int] | None:
    """The strides of a 2-D max pool with a 1x1 window and no padding (it picks every stride-th pixel, as
    ``x[..., ::sh, ::sw]`` does, with ceil_mode or not); None for any other pool."""
    if node.op == "call_module":
        args = vars(modules[node.target]) if node.target in modules else {}
    else:
        try:
            args = bind_args(F.max_pool2d, node)
        except TypeError:
            return None
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    kernel, padding, stride = args.get("kernel_size"), args.get("padding", 0), args.get("stride")
    if stride is None or stride == []:
        stride = kernel
    if (not all(isinstance(v, int) for v in (*pair(kernel), *pair(padding), *pair(stride))) or pair(kernel) != (1, 1)
            or pair(padding) != (0, 0) or args.get("return_indices")):
        return None
    return pair(stride)


def _quantized_pad_ok(node: torch.fx.Node) -> bool:
    """``F.pad`` runs on quantized tensors for constant-zero (pads the zero point) and reflect modes."""
    try:
        args = bind_args(F.pad, node)
    except TypeError:
        return False
    return (args["mode"] == "constant" and args["value"] in (None, 0, 0.0)) or args["mode"] == "reflect"


def _base(node: torch.fx.Node) -> str:
    return node.target if node.op == "call_module" else f"{node.name}_int8"


def _binary_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    args = list(node.args[:2])
    if node.op == "call_function" and node.target is torch.add and node.kwargs.get("alpha", 1) != 1:
        raise _KeepFloat("add with alpha != 1")
    extra = {k for k in node.kwargs if k != "alpha"}
    if len(args) != 2 or extra or not all(isinstance(a, torch.fx.Node) for a in args):
        raise _KeepFloat("needs two tensor inputs (a Python scalar operand stays float)")
    return args


def _cat_inputs(node: torch.fx.Node) -> tuple[list[torch.fx.Node], int]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) for t in tensors) \
            or not isinstance(dim, int):
        raise _KeepFloat("cat of a computed list or dim")
    return list(tensors), dim


def _explicit_padding(padding: Any, conv: nn.Module, dim: int) -> list[tuple[int, int]]:
    """Per spatial dim ``(before, after)``; ``'same'`` puts the odd pixel after, like PyTorch."""
    if padding == "valid":
        return [(0, 0)] * dim
    if padding == "same":
        out = []
        for k, d in zip(conv.weight.shape[2:], _tuple(conv.dilation, dim)):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in _tuple(padding, dim)]


def _tuple(value: Any, dim: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dim


class _FunctionalParams(nn.Module):
    """The weights and hyper-parameters of an ``F.conv*``/``F.linear`` call, shaped like its module."""


def _functional_params(gm, weight, bias, stride=1, padding=0, dilation=1, groups=1, dim=None) -> nn.Module:
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        raise _KeepFloat("weights are computed in the graph, not constants")
    if bias is not None and (not isinstance(bias, torch.fx.Node) or bias.op != "get_attr"):
        raise _KeepFloat("bias is computed in the graph, not a constant")
    params = _FunctionalParams()
    params.weight = get_attr_path(gm, weight.target)
    params.bias = get_attr_path(gm, bias.target) if bias is not None else None
    if dim is not None:
        params.stride, params.dilation = _tuple(stride, dim), _tuple(dilation, dim)
        params.padding = padding if isinstance(padding, str) else _tuple(padding, dim)
        params.groups = groups
    return params



def _dropout_in_training(node: torch.fx.Node) -> bool:
    """``F.dropout(..., training=True)`` is not a no-op (the default of ``training`` is True)."""
    if node.target is not F.dropout:
        return False
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return bool(training)
