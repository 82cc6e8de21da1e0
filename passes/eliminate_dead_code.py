"""``eliminate-dead-code``: remove unused nodes, then submodules and attributes nothing refers to.

A node is removed when nothing uses its value and running it has no effect we can see:

* placeholders and the output are always kept (the call signature does not change);
* impure nodes are kept: what ``torch.fx`` calls impure (asserts, random ops, side-effectful ops),
  in-place ops and ``out=``/``inplace=True`` calls (they write into a tensor that may be live), a
  BatchNorm in training mode (it updates its running statistics), and calls of modules outside
  ``torch.nn`` and fxopt (user code may have side effects; a note names them).

Then every submodule, parameter and buffer that no ``call_module``/``get_attr`` node refers to —
directly, through a used parent module, or as the parent of a used one — is deleted, as are plain
tensor attributes read only by removed ``get_attr`` nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx

from fxopt import Pass, PassResult
from fxopt.graph_utils import delete_if_unreferenced, is_mutating, is_referenced, module_of, referenced_targets

__all__ = ["EliminateDeadCode"]

logger = logging.getLogger(__name__)


def _module_is_pure(module: torch.nn.Module) -> bool:
    if getattr(module, "_is_impure", False) or getattr(module, "inplace", False) is True:
        return False
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
        return False
    origin = type(module).__module__
    return origin.startswith("torch.nn.") or origin.startswith("fxopt.") or isinstance(module, torch.fx.GraphModule)


def _removable(gm: torch.fx.GraphModule, node: torch.fx.Node, notes: list[str]) -> bool:
    if node.op in ("placeholder", "output") or node.users:
        return False
    if node.op == "call_module":
        module = module_of(gm, node)
        if module is None or not _module_is_pure(module):
            notes.append(f"{node.name}: unused call of {node.target} ({type(module).__name__}) kept, "
                         "it may have side effects")
            return False
        return True
    if is_mutating(node):
        return False
    return not node.is_impure()


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    """Remove unused nodes and the submodules/parameters/buffers nothing refers to any more."""

    name = "eliminate-dead-code"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        notes: list[str] = []
        removed_nodes = 0
        dropped_attrs: list[str] = []
        for node in reversed(list(gm.graph.nodes)):
            if _removable(gm, node, notes):
                if node.op == "get_attr":
                    dropped_attrs.append(node.target)
                gm.graph.erase_node(node)
                removed_nodes += 1

        targets = referenced_targets(gm)
        removed_attrs = sum(delete_if_unreferenced(gm, t) for t in dict.fromkeys(dropped_attrs))
        removed_modules, removed_tensors = _prune_unreferenced(gm, "", gm, targets)
        removed_attrs += removed_tensors

        modified = bool(removed_nodes or removed_attrs or removed_modules)
        if modified:
            gm.graph.lint()
            gm.recompile()
        stats = {"nodes": removed_nodes, "modules": removed_modules, "attributes": removed_attrs}
        logger.debug("eliminate-dead-code: %s", stats)
        return PassResult(gm, modified, stats, notes)


def _prune_unreferenced(gm: torch.fx.GraphModule, prefix: str, module: torch.nn.Module,
                        targets: set[str]) -> tuple[int, int]:
    """Delete unreferenced children, parameters and buffers of ``module``; (modules, tensors) deleted."""
    modules = tensors = 0
    for name, child in list(module.named_children()):
        path = prefix + name
        if not any(t == path or t.startswith(path + ".") for t in targets):
            delattr(module, name)
            modules += 1
        elif path not in targets:  # used only in parts: look inside
            m, t = _prune_unreferenced(gm, path + ".", child, targets)
            modules += m
            tensors += t
    own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    for name in own:
        if not is_referenced(prefix + name, targets):
            delattr(module, name)
            tensors += 1
    return modules, tensors
