"""Where a layer's value ends once fusion is taken into account (used by :func:`fxopt.compare`).

fxopt folds BatchNorm into the conv/linear before it and fuses the ReLU/ReLU6 after it, keeping the
conv's name: in an optimized model ``layer4.0.conv1`` computes ``relu(bn(conv(x)))``, in the original
only ``conv(x)``. So a layer's comparable value is taken at the *end of its group*: the layer's call
followed by the chain of single-reader BatchNorm / ReLU / ReLU6 / hardtanh(0, 6) ops, and the ops that
change nothing (observers, stubs, identity, dropout). Both models are read the same way, so a fused
model (group of one node) and an unfused one (group of three) meet at the same value.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["group_ends", "run_recording_groups", "sequential_group_ends"]

_GROUP_MODULES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout)
_GROUP_FUNCTIONS = {F.batch_norm, F.relu, torch.relu, F.relu6, F.dropout}
_GROUP_METHODS = {"relu", "relu_"}
_PASS_THROUGH = ("QuantStub", "DeQuantStub")


def _module_extends_group(mod: nn.Module | None) -> bool:
    if isinstance(mod, nn.Hardtanh):
        return (float(mod.min_val), float(mod.max_val)) == (0.0, 6.0)
    return isinstance(mod, _GROUP_MODULES) or type(mod).__name__ in _PASS_THROUGH or (
        callable(getattr(mod, "calculate_qparams", None)) and hasattr(mod, "calibrated"))  # observers


def _extends_group(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return _module_extends_group(modules.get(node.target))
    if node.op == "call_function":
        if node.target is F.hardtanh:
            return tuple(node.args[1:3]) == (0.0, 6.0) or tuple(node.args[1:3]) == (0, 6)
        return node.target in _GROUP_FUNCTIONS
    if node.op == "call_method":
        return node.target in _GROUP_METHODS
    return False


def group_ends(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, tuple[str, int]]:
    """End node of each layer group -> (layer name, call index), for groups led by a module call."""
    modules = dict(gm.named_modules())
    inside: set[torch.fx.Node] = set()
    calls: dict[str, int] = {}
    ends: dict[torch.fx.Node, tuple[str, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node in inside:
            continue
        end = node
        while len(end.users) == 1:
            user = next(iter(end.users))
            if not _extends_group(user, modules) or not user.args or user.args[0] is not end:
                break
            inside.add(user)
            end = user
        index = calls.get(node.target, 0)
        calls[node.target] = index + 1
        ends[end] = (node.target, index)
    return ends


def sequential_group_ends(model: nn.Module) -> dict[str, str | None]:
    """Group ends for a model read through forward hooks (no graph), from its ``nn.Sequential`` containers.

    In a Sequential the output of one child is the input of the next, so a child followed by BatchNorm /
    ReLU / ReLU6 / ... siblings (torchvision's ``Conv2dNormActivation``) forms the same group as in a graph.
    Returns ``{module name: layer name to record its output under, or None to not record it}``: the group's
    last module records under the leader's name and the leader itself records nothing. Modules that are not
    in such a group are absent (they record under their own name).
    """
    ends: dict[str, str | None] = {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = [(f"{prefix}.{n}" if prefix else n, m) for n, m in seq.named_children()]
        i = 0
        while i < len(children):
            j = i + 1
            if not _module_extends_group(children[i][1]):
                while j < len(children) and _module_extends_group(children[j][1]):
                    j += 1
            if j > i + 1:
                ends[children[i][0]] = None
                ends[children[j - 1][0]] = children[i][0]
            i = j
    return ends


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, ends: dict[torch.fx.Node, tuple[str, int]], snapshot) -> None:
        super().__init__(gm)
        self.ends, self.snapshot = ends, snapshot
        self.seen: dict[str, list[Any]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.ends:
            self.seen.setdefault(self.ends[n][0], []).append(self.snapshot(out))
        return out


def run_recording_groups(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, snapshot) -> tuple[Any, dict]:
    """Run ``gm`` and return its output and ``{layer name: [group-end value per call]}``."""
    recorder = _Recorder(gm, group_ends(gm), snapshot)
    bound = list(args)
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"][len(args):]:
        if node.target not in kwargs:
            break
        bound.append(kwargs[node.target])
    with torch.no_grad():
        out = recorder.run(*bound)
    return out, recorder.seen


