"""Shared test helpers (``from tests.helpers import ...``; the repository root is on pytest's ``pythonpath``).

``prepare_by_hand``: hand-built prepared graphs (the contract lowering reads), independent of the fxopt passes.

Every call node whose op the backend runs in int8 is put in the region, a QuantStub + observer goes
after each placeholder, an observer after each compute op and a DeQuantStub before the output.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

import fxopt
from fxopt import backends, meta
from fxopt.backends.spec import op_key
from fxopt.compare import sqnr_db
from fxopt.quant.observers import make_observer
from fxopt.quant.stubs import DeQuantStub, QuantConfig, QuantStub


def prepare_by_hand(model: torch.nn.Module, example: tuple, backend: str = "x86", *, activation: str = "minmax",
                    float_keys: frozenset[str] = frozenset(), inputs_from: tuple[str, ...] = ()
                    ) -> torch.fx.GraphModule:
    """``inputs_from``: node names whose outputs enter the region (default: the placeholders)."""
    spec = backends.get(backend).spec
    gm = fxopt.trace(model.eval(), example)
    graph = gm.graph
    counter = iter(range(10_000))

    def add(after: torch.fx.Node, module: torch.nn.Module, prefix: str) -> torch.fx.Node:
        name = f"{prefix}_{next(counter)}"
        gm.add_submodule(name, module)
        with graph.inserting_after(after):
            new = graph.call_module(name, (after,))
        after.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        meta.set_quant_region(new, spec.name)
        return new

    for node in list(graph.nodes):
        if (node.name in inputs_from) if inputs_from else node.op == "placeholder":
            stub = add(node, QuantStub(), "fxopt_quant")
            add(stub, make_observer(activation, spec.activation), "fxopt_obs")
        if node.op in ("call_module", "call_function", "call_method") and node.name not in inputs_from:
            key = op_key(node, gm)
            rule = spec.rule(key)
            if rule is None or key in float_keys or rule.kind == "weight_only":
                continue
            meta.set_quant_region(node, spec.name)
            if rule.kind == "compute":
                add(node, make_observer(activation, spec.activation), "fxopt_obs")
        if node.op == "output":
            src = node.args[0]
            with graph.inserting_before(node):
                gm.add_submodule("fxopt_dequant_0", DeQuantStub())
                deq = graph.call_module("fxopt_dequant_0", (src,))
            node.args = (deq,)
    meta.set_quant_config(gm, QuantConfig(spec.name, activation, "minmax", True, True, spec.activation, spec.weight))
    meta.set_backend(gm, spec.name)
    graph.lint()
    gm.recompile()
    return gm


def calibrate(gm: torch.fx.GraphModule, batches) -> torch.fx.GraphModule:
    with torch.no_grad():
        for b in batches:
            gm(*(b if isinstance(b, tuple) else (b,)))
    return gm


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """SQNR of ``out`` against ``ref`` in dB (``fxopt.compare``'s definition)."""
    return sqnr_db(ref, out)


class SmallEncoder(nn.Module):
    """Linear stem, a 2-layer ``nn.TransformerEncoder`` (batch_first), mean-pooled 5-way head. The encoder's
    cloned layers start equal; ``distinct_layers=True`` perturbs each so that no two share weights."""

    def __init__(self, width: int = 64, layers: int = 2, distinct_layers: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 5)
        if distinct_layers:
            with torch.no_grad():
                for i, lyr in enumerate(self.encoder.layers):
                    for p in lyr.parameters():
                        p.add_(0.05 * (i + 1) * torch.randn_like(p))

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))
