"""``apply-masks``: bake fxopt's compression parametrizations (pruning masks, clustered weights) into weights.

After fine-tuning, ``layer.weight`` stops being ``original * mask`` (or ``centroids[labels]``) and becomes a
plain parameter holding that value: zeros stay zeros, clustered layers keep their few distinct values, and
the model saves, folds BatchNorm and quantizes like any other. A tensor that also carries a parametrization
fxopt did not create is left as it is, with a note. Module-level pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn.utils import parametrize

from fxopt import Pass, PassResult
from fxopt.compress import is_compression_parametrization

from ._compress import own_copy

__all__ = ["ApplyMasks"]


@dataclass(frozen=True)
class ApplyMasks(Pass):
    """Replace masked / clustered weights by plain weights holding their current value."""

    name = "apply-masks"
    swaps_modules: ClassVar[bool] = True  # only replaces layers: compile may return the eager model (fxopt.compress.eager)
    module_level: ClassVar[bool] = True

    def call(self, gm: torch.nn.Module) -> PassResult:
        return PassResult(gm, *self.apply(gm))

    def apply(self, root: torch.nn.Module) -> tuple[bool, dict, list[str]]:
        baked = 0
        notes: list[str] = []
        for name, module in list(root.named_modules()):
            if not parametrize.is_parametrized(module):
                continue
            if not any(is_compression_parametrization(p) for plist in module.parametrizations.values() for p in plist):
                continue
            module = own_copy(root, module)
            _own_class(module)
            for tensor in list(module.parametrizations.keys()):
                plist = list(module.parametrizations[tensor])
                if not any(is_compression_parametrization(p) for p in plist):
                    continue
                if not all(is_compression_parametrization(p) for p in plist):
                    notes.append(f"{name}.{tensor}: not baked, it also has parametrizations fxopt did not create")
                    continue
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
                baked += 1
        if not baked:
            notes.append("no pruning mask or clustered weight to bake")
        return baked > 0, {"baked": baked}, notes


def _own_class(module: torch.nn.Module) -> None:
    """Give ``module`` its own copy of its ``Parametrized*`` class.

    ``copy.deepcopy`` of a parametrized module shares the dynamically created class with the original,
    and ``remove_parametrizations`` deletes the property from that class: without this, baking the masks
    of a copy would break the original (``'ParametrizedConv2d' object has no attribute 'weight'``).
    """
    cls = module.__class__
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)
