"""PlaceObservers: attach activation observers where an int8 graph needs qparams.

After :class:`InsertQuantStubs`, a value needs its own qparams when it enters a region (the output of a
``QuantStub``) or when an int8 op computes new values (op rule kind ``compute``: conv, linear, add,
cat…). An observer module is inserted right after each such node and all its users read through it.
Ops that do not change values (kind ``share``: pooling, reshape, relu after an int8 op…) take their
input's qparams, and ops with a fixed output range (kind ``fixed``: sigmoid…) take fixed ones, so
neither gets an observer. Weight qparams are computed from the weights at lowering time with the
observer kind recorded here (``fxopt.meta.quant_config``).

``share_cat=True`` (the default) gives a ``cat`` and its inputs one set of qparams where every input is computed only
for the cat (its producer's observer has the cat as its only reader), as torch.ao's x86 config does: the
lowered cat is then a copy (``quantized::cat`` memcpys inputs whose qparams equal its own) instead of a
requantization, and the inputs are rounded once, on the cat's grid, instead of twice. Observers are still
placed one per value, so calibration sees each input's range; :class:`Calibrate` then ties each such
group to the cat's observer (:func:`tie_cat_observers`), except where the inputs' ranges differ by more
than the backend's ``max_range_ratio`` (one scale would wipe out the small input: lowering keeps such a
cat float, as without sharing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch.fx

from fxopt import meta
from fxopt.backends.lowering import int8_spec
from fxopt.backends.spec import BackendSpec, op_key
from fxopt.errors import UnsupportedError
from fxopt.graph_utils import is_observer, unique_name
from fxopt.pass_base import Pass, PassContext, PassResult
from fxopt.quant.observers import Observer, make_observer
from fxopt.quant.stubs import QuantConfig, QuantStub

__all__ = ["PlaceObservers", "ACTIVATION_OBSERVERS", "WEIGHT_OBSERVERS", "tie_cat_observers"]

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
    # one set of qparams for a cat and the inputs computed only for it (see the module docstring)
    share_cat: bool = True
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
                        spec.activation, weight_spec, spec.depthwise_weight, share_cat=self.share_cat),
        )
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(targets), {"observers": len(targets)})


def _range_width(observer: torch.nn.Module) -> float:
    scale, zero_point = observer.calculate_qparams()
    return float(torch.as_tensor(scale).reshape(-1)[0]) * (observer.spec.qmax - observer.spec.qmin)


def _cat_groups(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node, list[torch.fx.Node]]]:
    """``(cat, its observer node, its input observer nodes)`` for every int8 cat whose tensor inputs are all
    observed values computed only for it (producer -> observer -> cat, nothing else reading either)."""
    modules = dict(gm.named_modules())

    def observer_node(node: Any) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "call_module" and is_observer(modules.get(node.target))

    groups = []
    for cat in gm.graph.nodes:
        if meta.quant_region(cat) is None or op_key(cat, gm) != "cat" or len(cat.users) != 1:
            continue
        out = next(iter(cat.users))
        tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        if not observer_node(out) or not isinstance(tensors, (list, tuple)) or not tensors:
            continue
        inputs = list(dict.fromkeys(tensors))
        if all(observer_node(t) and set(t.users) == {cat} and len(t.args[0].users) == 1
               and modules[t.target].spec == modules[out.target].spec for t in inputs):
            groups.append((cat, out, inputs))
    return groups


def tie_cat_observers(gm: torch.fx.GraphModule, max_range_ratio: float) -> tuple[int, list[str]]:
    """Point the input observers of each shareable cat (see :func:`_cat_groups`) at the cat's own observer,
    which saw exactly their values together, so all of them quantize with the cat's qparams. Run on a
    calibrated graph (``Calibrate`` does, when ``PlaceObservers(share_cat=True)`` prepared it). A cat whose
    inputs' calibrated ranges differ by more than ``max_range_ratio`` is left alone. Returns notes, one per
    ``(cats tied, notes)``, one note per cat tied or left alone."""
    modules = dict(gm.named_modules())
    notes = []
    tied = 0
    for cat, out, inputs in _cat_groups(gm):
        if all(t.target == out.target for t in inputs):
            continue  # already tied
        observers = [modules[t.target] for t in inputs]
        if not all(o.calibrated for o in observers) or not modules[out.target].calibrated:
            continue
        widths = [_range_width(o) for o in observers]
        if min(widths) > 0 and max(widths) / min(widths) > max_range_ratio:
            notes.append(f"{cat.name}: inputs keep their own qparams (ranges differ by "
                         f"{max(widths) / min(widths):.0f}x > max_range_ratio={max_range_ratio:g})")
            continue
        for t in inputs:
            old = t.target
            if old == out.target:  # this input already uses the cat's observer
                continue
            for node in gm.graph.nodes:  # an input may itself be a tied cat: move its whole group
                if node.op == "call_module" and node.target == old:
                    node.target = out.target
            gm.delete_submodule(old)
        tied += 1
        notes.append(f"{cat.name}: {len(inputs)} inputs share its qparams ({out.target})")
    if notes:
        gm.graph.lint()
        gm.recompile()
    return tied, notes
