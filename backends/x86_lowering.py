"""x86-only additions to the int8 lowering walk (:class:`fxopt.backends._lower_ops.OpLowering`).

Choices the generic walk cannot make, because they depend on x86's two kernel libraries:

* **Which library packs a conv.** The x86 engine packs grouped convs with more than 100 groups with
  fbgemm, whose fast depthwise kernel needs ``groups % 8 == 0`` (3×3 / 5×5, stride 1 or 2, no
  dilation); anything else falls into a per-group GEMM loop ~40× slower than float (shufflenet_v2's
  116-channel depthwise convs made the whole model 3× slower than float), and even its fast path is
  slower than oneDNN's. Those convs are packed with oneDNN instead; ``quantized::conv2d`` runs
  oneDNN-packed weights under any engine.
* **Conv + SiLU** (``Conv2d → SiLU``, EfficientNet): one oneDNN kernel with a ``swish`` post-op
  (:class:`~.qconv_onednn.QConvPointwise`) instead of a float island (dequantize, SiLU, quantize)
  between two int8 convs.
* **Conv + add (+ ReLU)** (residual blocks): ``relu(conv(x) + identity)`` in one kernel with one
  requantization (oneDNN's ``sum`` post-op). The conv is emitted where the add is (its inputs are
  already there), so the identity branch may be computed after the conv in the graph, as in
  torchvision's ResNet blocks. The kernel accumulates into the identity's buffer: when nothing reads
  that buffer afterwards (checked on the graph) it is used in place, otherwise copied first. Small
  convs (< ``_MIN_ADD_FUSION_MACS`` multiply-adds per sample) are left alone. **Off by default**
  (``X86Backend(fuse_add=True)``): measured end to end on ResNet18/50 and EfficientNet-B0 (AMD EPYC
  Zen 4, 1 thread, batch 1) the oneDNN pointwise conv is 3-8 % slower than ``quantized::conv2d`` on
  the same shapes, which eats the saved add pass (ResNet18: 12.0 ms fused vs 11.2 ms unfused).

* **Convs on 1×1 maps in float** (opt-in, ``X86Backend(float_unit_maps=True)``): squeeze-excitation
  gates (``avgpool → conv → act → conv → sigmoid``). One int8 kernel call costs a fixed 30-60 µs whatever
  the size; a float conv on an ``[N, C, 1, 1]`` vector ~10 µs in isolation, and it is exact. The gate is
  quantized once, where the int8 ``mul`` reads it (reported as float islands, reason included). Only
  convs with at most 64K weights. Off by default: end to end it measured level on EfficientNet-B0
  (20.9 vs 20.8 ms, 10 interleaved rounds) and 2-5 % slower on MobileNetV3-Large, whose SE convs
  are larger: at batch 1 a conv on a vector streams its weights, and float weights are 4× the bytes.

* **Convs on 1×1 maps packed with fbgemm** (``X86Backend(fbgemm_unit_maps=True)``, the default): the x86
  engine packs every conv with at most 100 groups with oneDNN, whose fixed cost per call dominates a conv
  on an ``[N, C, 1, 1]`` vector (squeeze-excitation gates): fbgemm's runs ~8 µs (27 %) less per call on
  EfficientNet-B0's and MobileNetV3's SE shapes (960→240 + ReLU: 26 vs 35 µs), with identical integers
  there. End to end (AMD EPYC Zen 4, 1 thread, batch 1, CPU time, paired ratios over 120-150 interleaved
  calls, load average ~20): MobileNetV3-Large 2-4 % faster (0.98× [0.91-1.06], 0.96× [0.91-1.00]), outputs
  bit-identical; EfficientNet-B0 level (0.99×, 1.00×: its SE fc1 convs keep the oneDNN swish kernel).

The oneDNN kernel choices need oneDNN and a CPU with VNNI (:func:`~.qconv_onednn.onednn_fusion_available`); without them
the walk is the generic one.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn

from fxopt import meta
from fxopt.graph_utils import is_observer
from fxopt.quant.spec import fused_activation_qparams

from ._lower_ops import OpLowering, _base, _binary_inputs, _explicit_padding, _fused_activation, _KeepFloat
from fxopt.quant.nn.onednn import QConvPointwise, onednn_fusion_available
from .spec import BackendSpec, OpRule, op_key

__all__ = ["X86Lowering", "onednn_packs_faster"]

# activation op key -> oneDNN post-op. Hardswish is not fused: quantized::hardswish after quantized::conv2d
# measured faster than oneDNN's conv + hardswish kernel (MobileNetV3, batch 1).
_UNARY = {"silu": "swish"}
_DEFERRED = object()  # env value of a conv that the add after it will emit
_MIN_ADD_FUSION_MACS = 5_000_000
_UNIT_MAP_MAX_WEIGHTS = 65_536  # float weights of at most 256 KB: larger ones cost more to read than int8's call
_UNIT_MAP_REASON = ("conv on a 1x1 map (squeeze-excitation gate): a float conv on a vector is faster than an "
                    "int8 kernel call, and exact")
_FRESH_OUTPUTS = ("QConv", "QConvPointwise", "QLinear", "QAdd", "QMul", "QCat")  # int8 modules that allocate


def onednn_packs_faster(conv: nn.Module) -> bool:
    """A grouped conv that the x86 engine would hand to fbgemm (more than 100 groups).

    Measured (AMD EPYC Zen 4, 1 thread, batch 1 and 8): oneDNN runs every depthwise shape of
    MobileNet/EfficientNet/ShuffleNet in 0.6-0.8x fbgemm's time, and fbgemm has no fast path at all
    when ``groups % 8 != 0`` (a per-group GEMM loop, 40x slower: shufflenet_v2's 116 channels).
    """
    return int(conv.groups) > 100


def _shape(node: torch.fx.Node) -> tuple | None:
    """Recorded shape of a value, looking through the observers and stubs inserted after tracing."""
    for _ in range(8):
        shape = meta.shape_of(node)
        if shape is not None:
            return tuple(shape)
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            return None
        node = node.args[0]
    return None


def _prepack(qmod: QConvPointwise, x: torch.fx.Node) -> None:
    shape = _shape(x)
    if shape is not None and len(shape) == 4:
        qmod.prepack(shape)


class X86Lowering(OpLowering):
    """The generic walk plus x86 kernel choices (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, spec: BackendSpec, onednn: bool = True, fuse_add: bool = True,
                 fuse_unary: bool = True, float_unit_maps: bool = False, fbgemm_unit_maps: bool = True) -> None:
        super().__init__(gm, spec)
        self.float_unit_maps = float_unit_maps
        self.fbgemm_unit_maps = fbgemm_unit_maps
        self.onednn = (onednn and onednn_fusion_available() and spec.engine in ("x86", "fbgemm")
                       and (self.config is None or self.config.symmetric_weights))
        self.fuse_add, self.fuse_unary = fuse_add, fuse_unary
        self._deferred: dict[torch.fx.Node, tuple[str, OpRule, nn.Module]] = {}
        self._fused_away: set[torch.fx.Node] = set()  # prepared values no lowered node holds (inside a fused kernel)

    def sources(self) -> dict[str, str]:
        """As the generic walk's, less the values computed inside a fused kernel: a fused conv's own output
        (before its SiLU or add) exists nowhere in the int8 graph, so ``lower(check=True)`` must not compare
        the simulation's conv output with the fused kernel's (activated) output."""
        hidden = {n.name for n in self._fused_away}
        return {old: new for old, new in super().sources().items() if old not in hidden}

    # ---- which library packs a conv ---------------------------------------------------------------
    def _conv_engine(self, conv: nn.Module, dim: int, x: torch.fx.Node | None = None) -> str:
        if dim == 2 and self.onednn and onednn_packs_faster(conv):
            self._count("conv_onednn_packed")
            return "onednn"
        # fbgemm on a VNNI CPU (self.onednn implies one) sums uint8 x int8 products in int32: no saturation
        if self.fbgemm_unit_maps and self.onednn and dim == 2 and conv.groups == 1 and x is not None \
                and "fbgemm" in torch.backends.quantized.supported_engines:
            shape = _shape(x)
            if shape is not None and len(shape) == 4 and shape[2:] == (1, 1):
                self._count("conv_on_unit_map_fbgemm_packed")
                return "fbgemm"
        return self.spec.engine

    # ---- convs on 1x1 maps: float --------------------------------------------------------------------
    def _on_unit_map(self, node: torch.fx.Node, key: str) -> bool:
        """A 2-D conv whose input has spatial size 1x1 (recorded shape): cheaper and exact in float."""
        if key != "conv2d" or not self.float_unit_maps or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return False
        shape = _shape(node.args[0])
        if shape is None or len(shape) != 4 or shape[2] != 1 or shape[3] != 1:
            return False
        module = self.modules.get(node.target) if node.op == "call_module" else None
        return isinstance(module, nn.Conv2d) and module.weight.numel() <= _UNIT_MAP_MAX_WEIGHTS

    def _build(self, node, key, module, qparams, relu) -> torch.fx.Node:
        if self._on_unit_map(node, key):
            raise _KeepFloat(_UNIT_MAP_REASON)
        if key in _UNARY and node.args and isinstance(node.args[0], torch.fx.Node) \
                and node.args[0] not in self.quantized:
            src = node.args[0]
            if src.op == "call_module" and is_observer(self.modules.get(src.target)) and src.args:
                src = src.args[0]
            raise _KeepFloat(f"{key} runs in int8 only fused into the conv before it; its input {src.name} is float")
        return super()._build(node, key, module, qparams, relu)

    # ---- fused oneDNN convs -----------------------------------------------------------------------
    def _compute(self, node: torch.fx.Node, key: str, rule: OpRule, module: nn.Module | None) -> None:
        if self._on_unit_map(node, key):
            super()._compute(node, key, rule, module)  # _build keeps it float
            return
        if self.onednn and key == "conv2d" and self._plain_conv(node, module) is not None:
            obs = self._observer_of(node)
            add = self._residual_add(obs) if self.fuse_add else None
            if add is not None and self._deferred_input(add) is None:  # emitted by the add
                self._deferred[node] = (key, rule, module)
                self._set(node, _DEFERRED, True, self._observer_qparams(obs))
                return
            if self.fuse_unary and self._unary_fusion(node, module, obs):
                return
        if self.onednn and key == "add" and self._deferred_input(node) is not None:
            self._conv_add(node, key, rule, module)
            return
        super()._compute(node, key, rule, module)

    def _plain_conv(self, node: torch.fx.Node, module: nn.Module | None) -> nn.Conv2d | None:
        """The ``nn.Conv2d`` of a module call with nothing fused yet, zero padding, symmetric pads."""
        if node.op != "call_module" or type(module) is not nn.Conv2d or module.padding_mode != "zeros":
            return None
        pads = _explicit_padding(module.padding, module, 2)
        if any(lo != hi for lo, hi in pads):
            return None
        return module

    def _residual_add(self, obs: torch.fx.Node) -> torch.fx.Node | None:
        """The add reading this conv's output (its only reader) with another int8 value of the same shape."""
        if len(obs.users) != 1:
            return None
        add = next(iter(obs.users))
        if meta.quant_region(add) is None or op_key(add, self.gm) != "add":
            return None
        try:
            a, b = _binary_inputs(add)
        except _KeepFloat:
            return None
        if a is b or obs not in (a, b):
            return None
        other = b if a is obs else a
        shape_conv, shape_other = _shape(obs), _shape(other)
        if shape_conv is None or shape_other is None or shape_conv != shape_other:
            return None  # broadcasting (or unknown shapes): the kernel adds same-shaped tensors only
        conv = self.modules[obs.args[0].target]
        macs = conv.weight[0].numel() * math.prod(shape_conv[1:])
        if macs < _MIN_ADD_FUSION_MACS:
            return None
        return add

    def _deferred_input(self, add: torch.fx.Node) -> torch.fx.Node | None:
        for arg in add.args[:2]:
            if isinstance(arg, torch.fx.Node) and arg.op == "call_module" and arg.args \
                    and arg.args[0] in self._deferred:
                return arg.args[0]
        return None

    def _dead_after(self, value: torch.fx.Node, add: torch.fx.Node) -> bool:
        """Whether ``value``'s int8 buffer is fresh (allocated by an int8 kernel) and read by nothing after ``add``."""
        new = self.env.get(value)
        if value not in self.quantized or not isinstance(new, torch.fx.Node) or new.op != "call_module" or \
                type(self.root.get(new.target)).__name__ not in _FRESH_OUTPUTS:
            return False
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        aliases = [n for n, v in self.env.items() if v is new]
        for alias in aliases:
            for user in alias.users:
                if user is add or user in aliases:
                    continue
                rule = self.spec.rule(op_key(user, self.gm))
                reads_only = rule is not None and rule.kind == "compute" and meta.quant_region(user) is not None
                if order[user] > order[add] or not reads_only or user in self._deferred:
                    return False
        return True

    def _unary_fusion(self, node: torch.fx.Node, conv: nn.Conv2d, obs: torch.fx.Node) -> bool:
        """``conv → SiLU/Hardswish`` as one kernel; ``False`` when the pattern is not there."""
        if len(obs.users) != 1:
            return False
        act = next(iter(obs.users))
        post_op = _UNARY.get(op_key(act, self.gm))
        if post_op is None or meta.quant_region(act) is None or not act.args or act.args[0] is not obs:
            return False
        if act.op == "call_module" and not isinstance(self.modules.get(act.target), (nn.SiLU, nn.Hardswish)):
            return False
        try:
            act_obs = self._observer_of(act)
        except Exception:  # noqa: BLE001 - no observer after the activation: not our pattern
            return False
        qparams = self._observer_qparams(act_obs)
        x = node.args[0]
        qx = self.qvalue(x)
        wq = self._weight_qparams(conv.weight, "conv2d", conv.groups)
        pads = [lo for lo, _ in _explicit_padding(conv.padding, conv, 2)]
        qmod = QConvPointwise.from_float(conv, wq, self.qparams[x], qparams, padding=pads, post_op=post_op)
        _prepack(qmod, x)
        value = self._emit_module(_base(node), qmod, (qx,))
        self.absorbed.add(act)
        self._set(node, value, True, qparams)
        self._fused_away.update((node, obs))
        self._count(f"conv2d+{op_key(act, self.gm)}")
        return True

    def _conv_add(self, add: torch.fx.Node, key: str, rule: OpRule, module: nn.Module | None) -> None:
        conv_node = self._deferred_input(add)
        conv_key, conv_rule, conv = self._deferred.pop(conv_node)
        conv_obs = next(iter(conv_node.users))
        a, b = _binary_inputs(add)
        other = b if a is conv_obs else a
        obs = self._observer_of(add)
        out_qparams = self._observer_qparams(obs)
        try:
            self._check_ranges(add, key)
            if other not in self.qparams:
                raise _KeepFloat(f"input {other.name} has no qparams")
        except _KeepFloat:  # emit the conv on its own, then the add the generic way (it stays float)
            super()._compute(conv_node, conv_key, conv_rule, conv)
            self._set(conv_obs, self.env[conv_node], True, self.qparams[conv_node])
            super()._compute(add, key, rule, module)
            return
        activation = _fused_activation(add, module)
        follower = self._absorbable_activation(obs) if activation is None else None
        act = activation or follower
        qparams = fused_activation_qparams(self.act_spec, out_qparams, act)
        x = conv_node.args[0]
        qx, qacc = self.qvalue(x), self.qvalue(other)
        wq = self._weight_qparams(conv.weight, conv_key, conv.groups)
        pads = [lo for lo, _ in _explicit_padding(conv.padding, conv, 2)]
        qmod = QConvPointwise.from_float(conv, wq, self.qparams[x], qparams, padding=pads,
                                         post_op="relu" if act is not None else "none",
                                         accum_qparams=self.qparams[other], accum_inplace=self._dead_after(other, add))
        _prepack(qmod, x)
        value = self._emit_module(_base(conv_node), qmod, (qx, qacc))
        if follower is not None:
            self.absorbed.add(next(iter(obs.users)))
        self._set(conv_obs, value, True, qparams)
        self._set(add, value, True, qparams)
        self._fused_away.update((conv_node, conv_obs))
        self._count("conv2d+add" + ("+relu" if act is not None else ""))
