"""The ``x86`` backend (alias ``fbgemm``): PyTorch's int8 CPU kernels for x86 (fbgemm / onednn).

The support table below is the whole story of what runs in int8. Activations are ``quint8``
asymmetric per tensor, weights ``qint8`` symmetric per output channel. ``reduce_range`` is off by
default: it only matters on CPUs without AVX-512 VNNI / AVX-VNNI, whose 16-bit accumulation could
overflow; pass ``X86Backend(reduce_range=True)`` for those.
"""

from __future__ import annotations

import torch

from fxopt.quant.spec import QSpec

from .lowering import Int8Backend
from .spec import BackendSpec, OpRule, common_int8_ops, weighted_compute_ops

__all__ = ["X86Backend", "x86_spec", "x86_engine"]


def x86_engine() -> str:
    """``"x86"`` where this torch build has it, else ``"fbgemm"``."""
    return "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"


def x86_spec(reduce_range: bool = False) -> BackendSpec:
    ops = common_int8_ops()
    ops.update(weighted_compute_ops(per_channel=True))  # per-channel weights, fused ReLU kernels
    ops["max_pool3d"] = OpRule("share", reason="max_pool3d on quantized tensors")
    return BackendSpec(
        name="x86",
        engine=x86_engine(),
        activation=QSpec(torch.quint8, symmetric=False, reduce_range=reduce_range),
        weight=QSpec(torch.qint8, symmetric=True, axis=0),
        weight_per_tensor=QSpec(torch.qint8, symmetric=True),
        ops=ops,
        notes=("reduce_range is needed only on CPUs without VNNI",),
    )


class X86Backend(Int8Backend):
    """Lower calibrated graphs to PyTorch int8 kernels under the x86 (or fbgemm) engine."""

    name = "x86"

    def __init__(self, reduce_range: bool = False) -> None:
        super().__init__(x86_spec(reduce_range))
