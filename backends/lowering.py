"""Static int8 lowering shared by the ``x86`` and ``qnnpack`` backends.

``lower_int8(gm, spec)`` turns a prepared + calibrated graph (QuantStub/Observer/DeQuantStub, see the
quantization design) into a graph of :mod:`fxopt.quant.nn.int8` calls on quantized tensors:

* ``QuantStub → Observer``      → ``torch.quantize_per_tensor`` with the observer's qparams;
* compute op → Observer         → an int8 module whose output qparams are the observer's (weight
  qparams come from the weights, with ``meta.quant_config(gm)``'s weight observer);
* a ReLU/ReLU6 right after a compute op's observer is absorbed: output qparams ``[0, hi]`` make the
  requantization clamp do the activation (with the fused ``*_relu`` kernel where there is one);
* share / fixed ops are kept: they run on quantized tensors;
* ``DeQuantStub``               → ``Tensor.dequantize``.

Values are quantized lazily: an op kept float (a float island chosen here, e.g. a ``cat`` of inputs
whose ranges differ by orders of magnitude) leaves a float value that is quantized with its observer's
qparams only where an int8 op reads it, so a float island feeding the graph output loses nothing.
"""

from __future__ import annotations

import logging

import torch
import torch.fx
import torch.nn as nn

from fxopt import meta
from fxopt.errors import CalibrationError, UnsupportedError
from fxopt.graph_utils import is_observer
from fxopt.quant.nn import QuantizedModel, engine_scope
from fxopt.quant.nn.model import freeze_mode
from fxopt.quant.stubs import QuantStub
from fxopt import registry
from fxopt.registry import Backend, Support

from ._lower_ops import OpLowering
from .spec import BackendSpec, op_key

__all__ = ["Int8Backend", "int8_spec", "lower_int8"]

logger = logging.getLogger(__name__)


class Int8Backend(Backend):
    """A backend running int8 graphs on PyTorch's quantized kernels, described by a :class:`BackendSpec`."""

    lowering_cls: type = OpLowering  # the node-by-node walk (a backend may add its own kernel choices)

    def __init__(self, spec: BackendSpec, freeze: bool | str = False) -> None:
        self.spec = spec
        self.freeze = freeze_mode(freeze)  # the lowered model runs frozen TorchScript traces (fxopt.quant.nn.frozen)

    def supports(self, node: torch.fx.Node) -> Support:
        gm = node.graph.owning_module
        key = op_key(node, gm)
        rule = self.spec.rule(key)
        if rule is None:
            what = key or (node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "op"))
            return Support(False, f"no int8 kernel for {what!r} on {self.spec.name}: it stays float")
        return Support(True, f"{key}: {rule.kind} ({rule.reason})" if rule.reason else f"{key}: {rule.kind}")

    def lower(self, gm: torch.fx.GraphModule) -> nn.Module:
        return lower_int8(gm, self.spec, self.lowering_cls, freeze=self.freeze)


def int8_spec(backend: str | Backend) -> BackendSpec:
    """The int8 support table of ``backend`` (a name or backend object); :class:`UnsupportedError` if it has none."""
    obj = registry.get(backend)
    if obj.spec is None:
        raise UnsupportedError(
            f"backend {obj.name!r} has no int8 support table; static int8 needs one of the PyTorch int8 backends "
            "('x86', 'qnnpack')")
    return obj.spec


def _check_prepared(gm: torch.fx.GraphModule, spec: BackendSpec) -> None:
    modules = dict(gm.named_modules())
    stubs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), QuantStub)]
    if not stubs:
        raise UnsupportedError(
            f"lowering to {spec.name!r} needs a prepared, calibrated graph but this one has no quant stubs: run "
            f"fxopt.passes.InsertQuantStubs(backend={spec.name!r}), PlaceObservers() and Calibrate(data) first "
            "(or use fxopt.recipes.static_int8(calibration_data))"
        )
    blind = [name for name, m in modules.items() if is_observer(m) and not m.calibrated]
    if blind:
        shown = ", ".join(blind[:5]) + (f" and {len(blind) - 5} more" if len(blind) > 5 else "")
        raise CalibrationError(
            f"{len(blind)} observer(s) saw no data ({shown}): run fxopt.passes.Calibrate(data) on the prepared "
            "graph before lowering it"
        )
    config = meta.quant_config(gm)
    act_bits = getattr(getattr(config, "activation_spec", None), "bits", 8)
    if act_bits < 8:
        raise UnsupportedError(
            f"activations were fake-quantized to {act_bits} bits, but {spec.name}'s int8 kernels requantize "
            f"every output to 8 bits, so the lowered model would not match the QAT model; prepare with "
            "activation_bits=8 to deploy on this backend (sub-8-bit weights are fine: they are stored as int8)"
        )
    prepared_for = meta.backend_of(gm)
    if prepared_for is not None and prepared_for != spec.name:
        logger.warning("graph was prepared for %r but is lowered to %r; weight qparams follow %r",
                       prepared_for, spec.name, spec.name)


def lower_int8(gm: torch.fx.GraphModule, spec: BackendSpec, lowering_cls: type = OpLowering, *,
               freeze: bool | str = False) -> QuantizedModel:
    """Lower a prepared + calibrated graph to int8 modules for ``spec``'s engine.

    ``lowering_cls`` is the walk (:class:`~fxopt.backends._lower_ops.OpLowering` or a backend's subclass).
    ``freeze=True`` / ``"auto"``: the returned model runs a frozen TorchScript trace of the graph per input
    signature (:class:`~fxopt.quant.nn.QuantizedModel`; ``"auto"`` logs fallbacks instead of warning).

    ``gm`` itself is not changed, but the lowered graph reuses its float submodules (float islands).
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"lower_int8 expects a torch.fx.GraphModule, got {type(gm).__name__}")
    _check_prepared(gm, spec)
    with engine_scope(spec.engine), torch.no_grad():
        lowering = lowering_cls(gm, spec)
        graph, root = lowering.run()
    lowered = torch.fx.GraphModule(root, graph, class_name="Int8GraphModule")
    # No dead-code elimination here: an unused in-place op (``buffer[...].copy_(image)`` in torchvision's
    # detection transform) is what fills a value read later; lowering itself erases what it orphans.
    lowered.delete_all_unused_submodules()
    lowered.graph.lint()
    lowered.recompile()
    lowered.meta.update({k: v for k, v in gm.meta.items()})
    islands = meta.float_islands(gm) + lowering.islands
    meta.set_float_islands(lowered, islands)
    meta.set_backend(lowered, spec.name)
    meta.set_lowered_from(lowered, lowering.sources())
    logger.info("lowered to %s: %s", spec.name, lowering.stats)
    model = QuantizedModel(lowered, spec.engine, freeze=freeze)
    model.eval()
    return model
