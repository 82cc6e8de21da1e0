"""PrepareQAT: turn a float graph into a trainable fake-quant graph for quantization-aware training.

The result is still a float ``GraphModule`` that trains with an ordinary PyTorch loop (or
``fxopt.finetune``) and lowers with ``fxopt.lower(module, backend)``. What changes:

1. Every ``nn.Conv1d/2d/3d`` becomes a :class:`fxopt.quant.qat.QATConv` that also absorbs the BatchNorm
   right after it (the standard fused scheme: weights fake-quantized after folding the BN statistics)
   and a following ReLU / ReLU6; every ``nn.Linear`` becomes a :class:`fxopt.quant.qat.QATLinear`
   (+ ReLU / ReLU6). ``add`` + ReLU is fused as for static int8 (``FuseActivations``).
2. Quant/dequant stubs go where the backend runs int8 (``InsertQuantStubs``) and an activation fake
   quantizer goes wherever static PTQ puts an observer (``PlaceObservers``): region entries and the
   outputs of compute ops. So lowering finds the same structure as after calibration.
3. Weights get a fake quantizer per output channel where the backend's kernel supports it, with
   ``weight_bits`` bits (e.g. 4: the grid ``[-8, 7]``, ``[-7, 7]`` on qnnpack); activations use the
   backend's activation spec with ``activation_bits`` bits. Gradients are straight-through;
   ``learnable=True`` learns the scales (LSQ).

``freeze_bn_after`` / ``freeze_observers_after``: after that many training forwards the BatchNorm
statistics / the observers stop updating (``None``: never; :func:`fxopt.quant.qat.freeze_bn` and
:func:`fxopt.quant.fake_quant.set_observers` do it by hand).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.fx
from torch import nn

from fxopt import meta
from fxopt.errors import UnsupportedError
from fxopt.pass_base import Pass, PassContext, PassResult
from fxopt.quant.stubs import DeQuantStub, QuantStub

from fxopt.graph_utils import (call_sites, delete_if_unreferenced, module_of, referenced_targets, set_attr_path,
                                unique_attr_name)
from .fuse_activations import FuseActivations, _activation
from .insert_quant_stubs import InsertQuantStubs
from .place_observers import PlaceObservers

__all__ = ["PrepareQAT", "QAT_ACTIVATION_OBSERVERS"]

QAT_ACTIVATION_OBSERVERS = ("moving_average", "minmax")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}
# share ops whose int8 kernel rounds its result onto the input's grid (the float op does not)
_ROUNDING_SHARE_OPS = frozenset({"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
                                 "adaptive_avg_pool2d", "adaptive_avg_pool3d"})


def _grid_source(gm, node, spec, fq_type) -> str | None:
    """The fake quantizer whose grid ``node``'s first input lies on (through value-preserving share ops)."""
    from fxopt.backends.spec import op_key  # noqa: PLC0415

    current = node.args[0] if node.args else None
    for _ in range(64):
        if not isinstance(current, torch.fx.Node) or meta.quant_region(current) is None:
            return None
        if current.op == "call_module" and isinstance(gm.get_submodule(current.target), fq_type):
            return current.target
        rule = spec.rule(op_key(current, gm))
        if rule is None or rule.kind != "share" or not current.args:
            return None
        current = current.args[0]
    return None


def _narrowed(spec, bits: int):
    """``spec`` with ``bits`` bits, keeping a restricted symmetric range (``[-127, 127]`` → ``[-7, 7]``)."""
    if bits == spec.bits and spec.quant_min is None:
        return spec
    restricted = spec.quant_min is not None and spec.quant_min == -spec.quant_max
    narrowed = replace(spec, bits=bits, quant_min=None, quant_max=None)
    if restricted:
        narrowed = replace(narrowed, quant_min=narrowed.qmin + 1, quant_max=narrowed.qmax)
    return narrowed


@dataclass(frozen=True)
class PrepareQAT(Pass):
    """Fake-quant graph for quantization-aware training (see the module docstring)."""

    name: ClassVar[str] = "prepare-qat"

    # None: the backend the pipeline targets (compile/lower's ``backend``), x86 when none is named
    backend: Any = None
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    learnable: bool = False
    activation: str = "moving_average"
    freeze_bn_after: int | None = None
    freeze_observers_after: int | None = None

    def __post_init__(self) -> None:
        if self.activation not in QAT_ACTIVATION_OBSERVERS:
            raise ValueError(f"QAT activation observer {self.activation!r} is not one of {QAT_ACTIVATION_OBSERVERS} "
                             "(histogram-style observers re-search their range on every training batch)")
        for what, bits in (("weight_bits", self.weight_bits), ("activation_bits", self.activation_bits)):
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"{what} must be an int in [2, 8], got {bits!r}")
        for what, n in (("freeze_bn_after", self.freeze_bn_after),
                        ("freeze_observers_after", self.freeze_observers_after)):
            if n is not None and (not isinstance(n, int) or n < 0):
                raise ValueError(f"{what} must be None or an int >= 0, got {n!r}")

    def with_context(self, context: PassContext) -> "PrepareQAT":
        return context.resolve(self, "recipes.qat()")

    @property
    def target(self) -> Any:
        """The backend prepared for: ``backend``, else the default (x86) when no pipeline named one."""
        return self.backend if self.backend is not None else PassContext.DEFAULT_BACKEND

    def requires(self, gm: torch.fx.GraphModule) -> None:
        from fxopt.quant.fake_quant import FakeQuantize  # noqa: PLC0415
        from fxopt.quant.observers import Observer  # noqa: PLC0415

        if any(isinstance(m, FakeQuantize) for m in gm.modules()):
            raise UnsupportedError("the graph is already prepared for QAT (it has fake quantizers); run PrepareQAT "
                                   "once, on the float model")
        observers = [name for name, m in gm.named_modules() if isinstance(m, Observer)]
        stubs = any(isinstance(m, (QuantStub, DeQuantStub)) for m in gm.modules())
        if observers or stubs or meta.quant_config(gm) is not None:
            calibrated = [n for n in observers if gm.get_submodule(n).calibrated]
            state = "statically calibrated" if calibrated else "prepared for static int8"
            raise UnsupportedError(
                f"PrepareQAT needs the float model, but this graph was already {state} (quant stubs / observers "
                f"{', '.join(observers[:3]) or ''}): start QAT from the float model, e.g. fxopt.compile(model, "
                "fxopt.recipes.qat()), instead of the output of recipes.static_int8 or InsertQuantStubs/PlaceObservers"
            )

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from fxopt.backends.lowering import int8_spec  # noqa: PLC0415 - passes may read a backend's spec

        spec = int8_spec(self.target)
        notes: list[str] = []
        stats = {"conv_bn": 0, "conv": 0, "linear": 0}
        qat_nodes = self._swap_layers(gm, stats, notes)
        FuseActivations()(gm)  # add + relu -> FusedAdd, as static int8 lowering expects
        stubs = InsertQuantStubs(backend=self.target)(gm)
        notes += stubs.notes
        if not stubs.modified:
            notes.append(f"no op runs in int8 on {spec.name}: nothing to fake-quantize")
            return PassResult(gm, bool(qat_nodes), {**stats, "fake_quant": 0}, notes)
        PlaceObservers(activation=self.activation, per_channel=self.per_channel, backend=self.target)(gm)

        act_spec = _narrowed(spec.activation, self.activation_bits)
        n_act = self._observers_to_fake_quant(gm, act_spec)
        n_grid = self._grid_rounding(gm, spec, act_spec)
        n_weight = self._attach_weight_fake_quant(gm, qat_nodes, spec, notes)
        config = meta.quant_config(gm)
        weight_spec = _narrowed(config.weight_spec, self.weight_bits)
        meta.set_quant_config(gm, replace(config, activation_spec=act_spec, weight_spec=weight_spec))
        if self.weight_bits < 8:
            notes.append(f"weights fake-quantized to {self.weight_bits} bits; lowering stores them as int8 values on "
                         f"the {self.weight_bits}-bit grid ({spec.name} has no {self.weight_bits}-bit kernels)")
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True, {**stats, "activation_fake_quant": n_act, "weight_fake_quant": n_weight,
                                          "grid_rounding": n_grid}, notes)

    # ---- 1. conv(+bn)(+act) / linear(+act) -> QAT modules -------------------------------------
    def _swap_layers(self, gm, stats, notes) -> list[torch.fx.Node]:
        from fxopt.quant.nn.qat import QATConv, QATLinear  # noqa: PLC0415

        swapped = []
        dropped: list[str] = []
        for node in list(gm.graph.nodes):
            layer = module_of(gm, node)
            if type(layer) not in _CONVS and type(layer) is not nn.Linear:
                continue
            why = self._why_not(gm, node, layer)
            if why:
                notes.append(f"{node.name}: weights not fake-quantized, {why}")
                continue
            tail = node
            bn = None
            if type(layer) in _CONVS:
                bn_node = self._single_user(tail)
                candidate = module_of(gm, bn_node) if bn_node is not None else None
                if type(candidate) is _BNS[type(layer)] and candidate.track_running_stats \
                        and len(call_sites(gm, candidate)) == 1:
                    bn, tail = candidate, bn_node
            act_node = self._single_user(tail)
            kind = _activation(gm, act_node, []) if act_node is not None and act_node.args \
                and act_node.args[0] is tail else None
            activation = _ACTIVATIONS[kind]() if kind else None
            if type(layer) is nn.Linear:
                qat: nn.Module = QATLinear(layer, activation)
                stats["linear"] += 1
            else:
                qat = QATConv(layer, bn, activation, freeze_bn_after=self.freeze_bn_after)
                stats["conv_bn" if bn is not None else "conv"] += 1
            set_attr_path(gm, node.target, qat)
            for absorbed in ([tail] if bn is not None and tail is not node else []) + ([act_node] if kind else []):
                absorbed.replace_all_uses_with(node)
                gm.graph.erase_node(absorbed)
                if absorbed.op == "call_module":
                    dropped.append(absorbed.target)
            if kind:
                meta.set_fused_activation(node, kind)
            swapped.append(node)
        for target in dict.fromkeys(dropped):
            delete_if_unreferenced(gm, target)
        return swapped

    @staticmethod
    def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
        return next(iter(node.users)) if len(node.users) == 1 else None

    @staticmethod
    def _why_not(gm, node, layer) -> str:
        if len(call_sites(gm, layer)) != 1:
            return f"{node.target} is called more than once (shared module)"
        if any(t.startswith(node.target + ".") for t in referenced_targets(gm)):
            return f"the graph also reads {node.target}'s parameters directly"
        if layer._forward_hooks or layer._forward_pre_hooks:
            return f"{node.target} has forward hooks"
        return ""

    # ---- 2. activation observers -> fake quantizers --------------------------------------------
    def _fake_quant(self, spec, kind: str, name: str, *, averaging: float | None = None):
        from fxopt.quant.observers import make_observer  # noqa: PLC0415
        from fxopt.quant.nn.qat import QATFakeQuantize, QATLearnableFakeQuantize  # noqa: PLC0415

        options = {} if averaging is None else {"averaging_constant": averaging}
        observer = make_observer(kind, spec, name=name, **options)
        cls = QATLearnableFakeQuantize if self.learnable else QATFakeQuantize
        return cls(observer, freeze_after=self.freeze_observers_after)

    def _observers_to_fake_quant(self, gm, act_spec) -> int:
        from fxopt.quant.observers import Observer  # noqa: PLC0415

        count = 0
        for node in gm.graph.nodes:
            observer = module_of(gm, node)
            if isinstance(observer, Observer):
                set_attr_path(gm, node.target, self._fake_quant(act_spec, self.activation, observer.name))
                count += 1
        return count

    def _grid_rounding(self, gm, spec, act_spec) -> int:
        """Round where int8 kernels round without an observer: average pooling (onto its input's grid)
        and fixed-range ops (sigmoid, tanh...: onto their fixed grid)."""
        from fxopt.backends.spec import op_key  # noqa: PLC0415
        from fxopt.quant.fake_quant import FakeQuantize  # noqa: PLC0415
        from fxopt.quant.nn.qat import FixedFakeQuantize, SharedFakeQuantize  # noqa: PLC0415

        count = 0
        for node in list(gm.graph.nodes):
            if meta.quant_region(node) is None:
                continue
            key = op_key(node, gm)
            rule = spec.rule(key)
            if rule is None or not (rule.kind == "fixed" or key in _ROUNDING_SHARE_OPS):
                continue
            if rule.kind == "fixed":
                target = unique_attr_name(gm, f"fxopt_fixed_fq_{node.name}")
                gm.add_submodule(target, FixedFakeQuantize(act_spec, *rule.fixed_qparams))
                args: tuple = ()
                anchor = node
            else:
                source = _grid_source(gm, node, spec, FakeQuantize)
                if source is None:
                    continue
                target = unique_attr_name(gm, f"fxopt_shared_fq_{node.name}")
                gm.add_submodule(target, SharedFakeQuantize(act_spec))
                with gm.graph.inserting_after(node):
                    scale = gm.graph.get_attr(f"{source}.scale")
                with gm.graph.inserting_after(scale):
                    zero_point = gm.graph.get_attr(f"{source}.zero_point")
                args, anchor = (scale, zero_point), zero_point
            with gm.graph.inserting_after(anchor):
                rounded = gm.graph.call_module(target, (node, *args))
            node.replace_all_uses_with(rounded, delete_user_cb=lambda user: user is not rounded)
            meta.set_quant_region(rounded, spec.name)
            count += 1
        return count

    # ---- 3. weight fake quantizers --------------------------------------------------------------
    def _attach_weight_fake_quant(self, gm, qat_nodes, spec, notes) -> int:
        count = 0
        for node in qat_nodes:
            qat = module_of(gm, node)
            if meta.quant_region(node) is None:
                notes.append(f"{node.name}: stays float on {spec.name}, weights not fake-quantized")
                continue
            rule = spec.rule(qat.op_key)
            per_channel = self.per_channel and bool(rule and rule.per_channel)
            wspec = _narrowed(spec.weight if per_channel else spec.weight_per_tensor, self.weight_bits)
            # the observer sees the current weights on every training step (averaging 1.0 = no history)
            qat.weight_fake_quant = self._fake_quant(wspec, "moving_average", f"{node.target}.weight", averaging=1.0)
            weight, _ = qat.folded()
            qat.weight_fake_quant.initialise(weight)
            count += 1
        return count
