"""PlaceObservers: attach activation observers where an int8 graph needs qparams.

After :class:`InsertQuantStubs`, a value needs its own qparams when it enters a region (the output of a
``QuantStub``) or when an int8 op computes new values (op rule kind ``compute``: conv, linear, add,
cat…). An observer module is inserted right after each such node and all its users read through it.
Ops that do not change values (kind ``share``: pooling, reshape, relu after an int8 op…) take their
input's qparams, and ops with a fixed output range (kind ``fixed``: sigmoid…) take fixed ones, so
neither gets an observer. Weight qparams are computed from the weights at lowering time with the
observer kind recorded here (``fxopt.meta.quant_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch.fx

from fxopt import meta
from fxopt.backends.lowering import int8_spec
from fxopt.backends.spec import BackendSpec, op_key
from fxopt.errors import UnsupportedError
from fxopt.graph_utils import unique_name
from fxopt.pass_base import Pass, PassContext, PassResult
from fxopt.quant.observers import Observer, make_observer
from fxopt.quant.stubs import QuantConfig, QuantStub

__all__ = ["PlaceObservers", "ACTIVATION_OBSERVERS", "WEIGHT_OBSERVERS"]

ACTIVATION_OBSERVERS = ("minmax", "moving_average", "histogram", "percentile", "mse")
WEIGHT_OBSERVERS = ("minmax", "mse", "percentile")


@dataclass(frozen=True)
class PlaceObservers(Pass):
    name: ClassVar[str] = "place-observers"

    activation: str = "histogram"
    weight: str = "minmax"
    per_channel: bool = True
    symmetric_weights: bool = True
    # keyword options of the activation observer class, e.g. {"clip_weight": 4.0} for "histogram"
    activation_options: dict = field(default_factory=dict)
    # the backend object the pipeline targets (from its PassContext); None: the one the graph was prepared for
    backend: Any = field(default=None, repr=False)

    def with_context(self, context: PassContext) -> "PlaceObservers":
        return replace(self, backend=context.backend) if self.backend is None and context.backend is not None \
            else self

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATION_OBSERVERS:
            raise ValueError(f"activation observer {self.activation!r} is not one of {ACTIVATION_OBSERVERS}")
        if self.weight not in WEIGHT_OBSERVERS:
            raise ValueError(f"weight observer {self.weight!r} is not one of {WEIGHT_OBSERVERS}")
        if self.activation_options:
            from fxopt.quant.spec import QSpec  # noqa: PLC0415

            try:
                make_observer(self.activation, QSpec(), **self.activation_options)
            except TypeError as exc:
                raise ValueError(f"activation_options {self.activation_options} do not fit the "
                                 f"{self.activation!r} observer: {exc}") from exc

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if meta.backend_of(gm) is None:
            raise UnsupportedError(
                "PlaceObservers needs a graph with quant stubs: run fxopt.passes.InsertQuantStubs(backend=...) "
                "first (or use fxopt.recipes.static_int8)"
            )

    def _spec(self, gm: torch.fx.GraphModule) -> BackendSpec:
        """The spec the graph was prepared with: the pipeline's backend object when it is that backend (it may
        carry options, e.g. ``X86Backend(reduce_range=True)``), else the registered one of that name."""
        prepared_for = meta.backend_of(gm)
        if self.backend is not None and int8_spec(self.backend).name == prepared_for:
            return int8_spec(self.backend)
        return int8_spec(prepared_for)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if any(isinstance(m, Observer) for m in gm.modules()):
            return PassResult(gm, False, {"observers": 0}, ["the graph already has observers"])
        spec = self._spec(gm)
        weight_spec = spec.weight if self.per_channel else spec.weight_per_tensor
        if not self.symmetric_weights:
            weight_spec = replace(weight_spec, symmetric=False)

        targets = []
        for node in gm.graph.nodes:
            if meta.quant_region(node) is None:
                continue
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantStub):
                targets.append(node)
                continue
            rule = spec.rule(op_key(node, gm))
            if rule is not None and rule.kind == "compute":
                targets.append(node)

        next_index = 0
        for node in targets:
            target = unique_name("fxopt_obs", lambda n: hasattr(gm, n), start=next_index)
            next_index = int(target.rsplit("_", 1)[1]) + 1
            observer = make_observer(self.activation, meta.operand_spec(node) or spec.activation,
                                     **self.activation_options)
            observer.name = f"{target} (after {node.name})"
            gm.add_submodule(target, observer)
            with gm.graph.inserting_after(node):
                obs_node = gm.graph.call_module(target, (node,))
            node.replace_all_uses_with(obs_node, delete_user_cb=lambda user: user is not obs_node)
            meta.set_quant_region(obs_node, spec.name)

        meta.set_quant_config(
            gm,
            QuantConfig(spec.name, self.activation, self.weight, self.per_channel, self.symmetric_weights,
                        spec.activation, weight_spec, spec.depthwise_weight),
        )
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(targets), {"observers": len(targets)})
