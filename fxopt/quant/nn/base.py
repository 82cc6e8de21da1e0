"""The small interfaces the modules that run a model declare, so passes, backends, save/load and the report
rely on a declared contract instead of reading attributes by name.

* :class:`QuantizedModule`: every fxopt int8 / dynamic / fp16 module. ``fxopt_weights()`` lists the tensors
  it stores (``fxopt.report`` counts their bytes); modules that ``fxopt.save`` can write as plain data also
  give ``fxopt_state()`` and ``fxopt_from_state(state)`` (listed in ``fxopt.quant.nn.STORABLE``). What a
  module holds outside parameters and buffers (packed int8/fp16 weights, output qparams) it declares with
  ``_state_tensors()`` / ``_set_state_tensors()``, so ``state_dict()`` shows it and ``load_state_dict``
  restores it (packed again under the module's engine).
* :class:`FusedModule`: a float module computing ``activation(inner(...))`` (from ``fuse-activations``);
  ``op_key`` is what backends see, ``inner`` the conv/linear (``None`` for an add) and ``activation_kind``
  ``"relu"``/``"relu6"``.
* :class:`DescribesWeights`: the one-method protocol ``fxopt.report`` reads (user modules may provide it).
"""

from __future__ import annotations

import abc
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from fxopt.errors import UnsupportedError

__all__ = ["DescribesWeights", "FusedModule", "QuantizedModule"]


@runtime_checkable
class DescribesWeights(Protocol):
    """A module that lists the tensors it stores (packed weights included), by name."""

    def fxopt_weights(self) -> dict[str, torch.Tensor]: ...


class QuantizedModule(nn.Module):
    """Base of fxopt's int8, dynamic int8 and fp16 modules."""

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        """The tensors this module stores (quantized tensors allowed), by name."""
        return {}

    # state_dict / load_state_dict of what is not a parameter or buffer ---------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor | None]:
        """Tensors held outside parameters and buffers (packed weights as quantized/fp16 tensors, qparams),
        by state-dict key (without the module's prefix)."""
        return {}

    def _set_state_tensors(self, tensors: dict[str, torch.Tensor | None]) -> None:
        """Restore what :meth:`_state_tensors` gave (every key present)."""

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self._state_tensors().items():
            destination[prefix + key] = value

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        expected = list(self._state_tensors())
        found = {key: state_dict.pop(prefix + key) for key in expected if prefix + key in state_dict}
        missing_keys.extend(prefix + key for key in expected if key not in found)
        if found and len(found) == len(expected):
            try:
                self._set_state_tensors(found)
            except (RuntimeError, TypeError, ValueError) as exc:
                error_msgs.append(f"{type(self).__name__} at {prefix or 'the root'!r}: {exc}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def fxopt_state(self) -> dict[str, Any]:
        """Constructor state as plain data (tensors, numbers, strings) for fxopt's int8 file format. Only the
        classes in ``fxopt.quant.nn.STORABLE`` have one; the others are refused with a typed error."""
        raise UnsupportedError(f"{type(self).__name__} is not in fxopt.quant.nn.STORABLE: fxopt.save cannot store "
                               "it as plain data; save its state_dict() instead")

    @classmethod
    def fxopt_from_state(cls, state: dict[str, Any]) -> "QuantizedModule":
        """Rebuild the module from :meth:`fxopt_state`'s output (packing weights again where needed)."""
        raise UnsupportedError(f"{cls.__name__} is not in fxopt.quant.nn.STORABLE: it cannot be rebuilt from "
                               "plain data")


_ACTIVATION_KINDS: dict[type, str] = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


class FusedModule(nn.Module, abc.ABC):
    """``activation(inner(...))`` as one module (float numerics unchanged)."""

    activation: nn.Module

    @property
    @abc.abstractmethod
    def op_key(self) -> str:
        """The op backends see (``fxopt.backends.spec.op_key``): the inner op, with the activation fused."""

    @property
    @abc.abstractmethod
    def inner(self) -> nn.Module | None:
        """The module whose output the activation reads (conv / linear); ``None`` for an add."""

    @property
    def activation_kind(self) -> str:
        """``"relu"`` or ``"relu6"``: the activation this module applies after its op."""
        return _ACTIVATION_KINDS[type(self.activation)]

    @staticmethod
    def activation_for(kind: str) -> nn.Module:
        """A fresh activation module for ``kind`` (``"relu"``/``"relu6"``)."""
        return {v: k for k, v in _ACTIVATION_KINDS.items()}[kind]()
