"""``linearize-conv1d``: turn Hugging Face transformers' ``Conv1D`` layers into ``nn.Linear``.

GPT-2 (and GPT-Neo-style code built on ``transformers.pytorch_utils.Conv1D``) computes its projections with
``Conv1D``: ``addmm(bias, x, W)`` with the weight stored ``(in, out)``, i.e. a Linear whose weight is
transposed. Static int8 knows ``nn.Linear``, not that class, so without this pass a GPT-2 graph had nothing to
quantize. The pass puts an ``nn.Linear`` with the transposed weight (copied, contiguous) and the same bias
at the same module path; the graph's calls do not change. The result equals the original up to float
summation order (``addmm`` vs ``linear``). Other modules named ``Conv1D`` (not transformers' shape of it) are
left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from fxopt import Pass, PassResult
from fxopt.export_frontend import conv1d_as_linear, is_conv1d

__all__ = ["LinearizeConv1D"]


@dataclass(frozen=True)
class LinearizeConv1D(Pass):
    name: ClassVar[str] = "linearize-conv1d"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        swapped = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if is_conv1d(module):
                gm.set_submodule(node.target, conv1d_as_linear(module))
                swapped.append(node.target)
        notes = [f"Conv1D -> Linear: {', '.join(swapped[:6])}{' ...' if len(swapped) > 6 else ''}"] if swapped else []
        return PassResult(gm, bool(swapped), {"linearized": len(swapped)}, notes)
