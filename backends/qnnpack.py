"""The ``qnnpack`` backend: PyTorch's int8 kernels for ARM (Raspberry Pi, phones); runs on x86 too.

Differences from ``x86``, as data in the table below:

* no ``reduce_range`` (qnnpack accumulates in 32 bits);
* weights symmetric in ``[-127, 127]`` (qnnpack adds 128 to int8 weights to use uint8 kernels, and the
  XNNPACK-backed paths expect a symmetric range);
* no ``max_pool3d`` kernel (``"QNNPACK backend doesn't support quantized_max_pool3d"``): it stays float;
* conv3d: qnnpack can run it but cannot unpack its weights (the int8 module keeps a copy for saving).

Per-channel conv/linear weights are accepted by torch 2.14's qnnpack (checked in tests/backends).
"""

from __future__ import annotations

import torch

from fxopt.quant.spec import QSpec

from .lowering import Int8Backend
from .spec import BackendSpec, common_int8_ops, weighted_compute_ops

__all__ = ["QnnpackBackend", "qnnpack_spec"]


def qnnpack_spec(per_channel: bool = True) -> BackendSpec:
    ops = common_int8_ops()
    ops.update(weighted_compute_ops(per_channel=per_channel))
    return BackendSpec(
        name="qnnpack",
        engine="qnnpack",
        activation=QSpec(torch.quint8, symmetric=False, reduce_range=False),
        weight=QSpec(torch.qint8, symmetric=True, axis=0, quant_min=-127, quant_max=127),
        weight_per_tensor=QSpec(torch.qint8, symmetric=True, quant_min=-127, quant_max=127),
        ops=ops,
        notes=("no reduce_range", "weights in [-127, 127]", "max_pool3d stays float"),
    )


class QnnpackBackend(Int8Backend):
    """Lower calibrated graphs to PyTorch int8 kernels under the qnnpack engine.

    ``freeze=True`` runs the lowered graph as a frozen TorchScript trace per input signature (as ``X86Backend``).
    """

    name = "qnnpack"

    def __init__(self, per_channel: bool = True, freeze: bool | str = False) -> None:
        super().__init__(qnnpack_spec(per_channel), freeze=freeze)
