"""The untraced root: a model whose own ``forward`` no frontend can follow, kept whole in a GraphModule.

When neither torch.fx (with leaves and example values) nor torch.export can trace the root's
``forward``, ``fxopt.compile`` still runs the passes that work on modules rather than on the graph
(``Pass.module_level``: dynamic quantization, fp16, and the compression passes that opt in). The
model is then wrapped in a GraphModule whose graph is one opaque call of the model's own ``forward``:

* the GraphModule's submodules, parameters and buffers are the model's own, under the model's own
  names (``encoder.layer.0.attention.self.query``), so module passes, ``state_dict`` and
  ``fxopt.report`` see the model as it is;
* every call hands the current top-level submodules (and the root's own tensors) back to the model
  before running its ``forward``, so a pass that replaces ``pooler`` or ``classifier`` is seen;
* the output is whatever the model returns (its type included);
* ``fxopt.untraced(gm) == [""]``: the root (``model.get_submodule("")``) is the untraced part, with
  the reason in ``fxopt.meta.leaves(gm)`` and a note in ``fxopt.meta.trace_notes(gm)``.

Graph passes see that the graph has nothing for them and report ``modified=False`` with a note.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.fx

from . import meta

__all__ = ["UntracedRoot", "HOLDER", "keep_untraced", "run_untraced_root"]

log = logging.getLogger(__name__)

HOLDER = "fxopt_untraced_root"  # the GraphModule attribute (not a submodule) holding the model


class UntracedRoot:
    """Holds the model whose ``forward`` runs untraced. A plain object, not a module: the model's
    children are registered on the GraphModule itself, once, under their own names."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __repr__(self) -> str:
        return f"UntracedRoot({type(self.model).__name__})"


def run_untraced_root(
    holder: UntracedRoot,
    training: bool,
    state: dict[str, Any],
    positional: tuple,
    var_positional: tuple,
    keywords: dict[str, Any],
    var_keyword: dict[str, Any],
) -> Any:
    """Install the GraphModule's current top-level submodules and tensors on the model, then run it."""
    model = holder.model
    model.training = training
    for name, value in state.items():
        if isinstance(value, torch.nn.Module):
            model._modules[name] = value
        elif name in model._parameters:
            model._parameters[name] = value  # may be a converted (fp16 → upcast) tensor
        else:
            model._buffers[name] = value
    return model(*positional, *var_positional, **keywords, **var_keyword)


_LITERALS = (type(None), bool, int, float, str)


def _mirrors_signature(params: list[inspect.Parameter]) -> bool:
    """Whether the generated forward can repeat the model's signature (defaults Python can spell)."""
    has_var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    for p in params:
        if p.default is not p.empty and not isinstance(p.default, _LITERALS):
            return False
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty and not has_var_positional:
            return False
        if p.kind is p.POSITIONAL_ONLY:
            return False
    return True


def keep_untraced(model: torch.nn.Module, reason: str) -> torch.fx.GraphModule:
    """A GraphModule that runs ``model``'s ``forward`` as one call (see the module docstring).

    ``model`` becomes part of the result (the caller passes a copy it owns).
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    if not params or not _mirrors_signature(params):
        params = [
            inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    graph = torch.fx.Graph()
    positional, keywords = [], {}
    var_positional: Any = ()
    var_keyword: Any = {}
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            var_positional = graph.placeholder("*" + p.name)
        elif p.kind is p.VAR_KEYWORD:
            var_keyword = graph.placeholder("**" + p.name)
        else:
            default = inspect.Signature.empty if p.default is p.empty else p.default
            node = graph.placeholder(p.name, default_value=default)
            if p.kind is p.KEYWORD_ONLY:
                keywords[p.name] = node
            else:
                positional.append(node)

    attributes: dict[str, Any] = {HOLDER: UntracedRoot(model), "training": model.training}
    attributes.update(model.named_children())
    attributes.update(model.named_parameters(recurse=False))
    attributes.update(model.named_buffers(recurse=False))
    state = {name: graph.get_attr(name) for name in attributes if name not in (HOLDER, "training")}
    call = graph.call_function(
        run_untraced_root,
        (graph.get_attr(HOLDER), graph.get_attr("training"), state, tuple(positional), var_positional,
         keywords, var_keyword),
    )
    graph.output(call)
    gm = torch.fx.GraphModule(attributes, graph, type(model).__name__)
    gm.training = model.training
    info = meta.LeafInfo("", type(model).__name__, f"untraced root: {reason}")
    meta.set_leaves(gm, [info])
    meta.set_trace_notes(gm, [
        f"{type(model).__name__} is kept as an untraced root: {reason}. Module-level passes (dynamic "
        "quantization, fp16...) still apply; graph passes have no graph to work on"
    ])
    log.warning("%s is kept as an untraced root (module-level passes only): %s", type(model).__name__, reason)
    return gm

