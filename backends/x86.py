"""The ``x86`` backend (alias ``fbgemm``): PyTorch's int8 CPU kernels for x86 (fbgemm / onednn).

The support table below is the whole story of what runs in int8. Activations are ``quint8``
asymmetric per tensor, weights ``qint8`` symmetric per output channel. ``reduce_range`` is off by
default: it only matters on CPUs without AVX-512 VNNI / AVX-VNNI, whose 16-bit accumulation could
overflow; pass ``X86Backend(reduce_range=True)`` for those.
"""

from __future__ import annotations

import functools

import torch

from fxopt.quant.spec import QSpec

from .lowering import Int8Backend
from .spec import BackendSpec, OpRule, common_int8_ops, weighted_compute_ops
from fxopt.quant.nn.onednn import onednn_fusion_available
from .x86_lowering import X86Lowering

__all__ = ["X86Backend", "x86_spec", "x86_engine"]


def x86_engine() -> str:
    """``"x86"`` where this torch build has it, else ``"fbgemm"``."""
    return "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"


def x86_spec(reduce_range: bool = False) -> BackendSpec:
    ops = common_int8_ops()
    ops.update(weighted_compute_ops(per_channel=True))  # per-channel weights, fused ReLU kernels
    ops["max_pool3d"] = OpRule("share", reason="max_pool3d on quantized tensors")
    if onednn_fusion_available():  # SiLU after a conv is a oneDNN post-op (x86_lowering); alone it stays float
        ops["silu"] = OpRule("compute", reason="fused into the conv before it (oneDNN swish post-op)")
    return BackendSpec(
        name="x86",
        engine=x86_engine(),
        activation=QSpec(torch.quint8, symmetric=False, reduce_range=reduce_range),
        weight=QSpec(torch.qint8, symmetric=True, axis=0),
        weight_per_tensor=QSpec(torch.qint8, symmetric=True),
        ops=ops,
        # fbgemm's depthwise kernels add pairs of uint8 x int8 products in int16 even on VNNI CPUs:
        # 255 * 127 * 2 saturates it (found by lower(check=True) on mobilenet_v3), 255 * 63 * 2 does not
        depthwise_weight=QSpec(torch.qint8, symmetric=True, axis=0, quant_min=-63, quant_max=63),
        notes=("reduce_range is needed only on CPUs without VNNI", "depthwise conv weights in [-63, 63]"),
    )


class X86Backend(Int8Backend):
    """Lower calibrated graphs to PyTorch int8 kernels under the x86 (or fbgemm) engine.

    ``onednn=False`` turns off the x86 kernel choices of :mod:`fxopt.backends.x86_lowering` (oneDNN packing
    of >100-group convs, conv+SiLU fusion); ``fuse_add=True`` adds conv+add(+ReLU) fusion (off: measured
    slower end to end on this project's reference CPU); ``fuse_unary=False`` keeps SiLU a float island;
    ``float_unit_maps=True`` keeps convs on 1x1 maps (squeeze-excitation gates) float: exact, cheaper per call
    in isolation, but measured level end to end (see :mod:`fxopt.backends.x86_lowering`);
    ``fbgemm_unit_maps=False`` packs convs on 1x1 maps with oneDNN like the x86 engine does, instead of fbgemm;
    ``freeze="auto"`` (default) runs the lowered graph as a frozen TorchScript trace per input signature (same
    kernels, outputs checked bit-identical at each trace, less Python per op; :mod:`fxopt.quant.nn.frozen`);
    calls it cannot trace run the eager graph, logged; ``freeze=True`` warns on such fallbacks;
    ``freeze=False`` runs the fx graph's Python (forward hooks on its submodules fire on every call).
    """

    name = "x86"

    def __init__(self, reduce_range: bool = False, onednn: bool = True, fuse_add: bool = False,
                 fuse_unary: bool = True, float_unit_maps: bool = False, fbgemm_unit_maps: bool = True,
                 freeze: bool | str = "auto") -> None:
        super().__init__(x86_spec(reduce_range), freeze=freeze)
        self.lowering_cls = functools.partial(X86Lowering, onednn=onednn, fuse_add=fuse_add, fuse_unary=fuse_unary,
                                              float_unit_maps=float_unit_maps, fbgemm_unit_maps=fbgemm_unit_maps)
