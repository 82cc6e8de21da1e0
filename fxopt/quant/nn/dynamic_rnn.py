"""Dynamically quantized LSTM and GRU that hold up on trained models.

Why ``torch.ao``'s dynamic LSTM collapses on trained models (measured on a 3-layer, 256-unit encoder,
160 steps; see ``bench/bench_dynamic.py``): its weights are quantized **per tensor**, one scale over
the four concatenated gate blocks. Trained gates have very different row magnitudes (the cell-gate
rows are larger, some rows hold large weights), so the rows with small weights keep only a few levels
and their error is fed back at every step, for 160 steps and three layers (mean cosine 0.87 there;
per-channel weights alone bring it to 0.98). ``reduce_range`` (7-bit activations) costs a further
few thousandths, and needlessly on CPUs with VNNI. The hidden state is *not* the problem: ``h`` lies in
[-1, 1] and is quantized per step over its own range by the dynamic kernel.

What fxopt does:

* int8 weights **per output row** (per gate row), symmetric, for ``W_ih`` and ``W_hh`` of every layer;
* activations quantized per call over their own range, 8 bits unless the CPU needs ``reduce_range``;
* the most sensitive matrix, the first layer's input projection (it reads the raw features, whose
  per-tensor 8-bit quantization loses the low-energy channels), is stored in fp16 (``first_input_fp16``);
  it is small (input_size x 4*hidden); under qnnpack, which has no fp16 linear kernel, it stays int8;
* the recurrence runs in PyTorch's C++ kernels (``quantized_lstm`` / ``quantized_gru``) on cell
  parameters fxopt builds from its own packed weights, so there is no Python loop over time steps.

``num_layers``, ``bidirectional``, ``batch_first``, ``bias=False``, initial states, unbatched inputs and
``PackedSequence`` inputs are supported; ``proj_size > 0`` is not (the pass leaves such modules float).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

from ..qstate import dtype_from_name, dtype_name, qtensor_from_state, qtensor_state
from .base import QuantizedModule
from .dynamic import _check_dtype, fp16_linear_available, needs_reduce_range, pack_linear, pack_stored, unpack_linear

__all__ = ["DynamicRNN", "DynamicLSTM", "DynamicGRU"]

_q = torch.ops.quantized


class DynamicRNN(QuantizedModule):
    """Common part of :class:`DynamicLSTM` and :class:`DynamicGRU`."""

    mode = ""  # "LSTM" or "GRU"

    def __init__(self, float_rnn: nn.RNNBase, dtype: torch.dtype = torch.qint8,
                 reduce_range: bool | None = None, first_input_fp16: bool = True):
        super().__init__()
        _check_dtype(dtype)
        if getattr(float_rnn, "proj_size", 0):
            raise ValueError(f"{type(float_rnn).__name__} with proj_size > 0 cannot be quantized dynamically")
        for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional"):
            setattr(self, attr, getattr(float_rnn, attr))
        self.dtype = dtype
        self.reduce_range = needs_reduce_range() if reduce_range is None else reduce_range
        # (name, packed weights, storage dtype) per matrix, in layer / direction order
        self._packed: list[tuple[str, torch.ScriptObject, torch.dtype]] = []
        self._biases: dict[str, torch.Tensor] = {}
        first_input_fp16 = first_input_fp16 and fp16_linear_available()  # qnnpack: no fp16 kernels
        for layer in range(self.num_layers):
            for suffix in self._suffixes(layer):
                for kind in ("ih", "hh"):
                    w = getattr(float_rnn, f"weight_{kind}{suffix}")
                    b = getattr(float_rnn, f"bias_{kind}{suffix}") if self.bias else None
                    fp16 = dtype == torch.float16 or (first_input_fp16 and layer == 0 and kind == "ih")
                    store = torch.float16 if fp16 else torch.qint8
                    self._packed.append((f"{kind}{suffix}", pack_linear(w, b, store), store))
                    self._biases[f"{kind}{suffix}"] = (b.detach().float().clone() if b is not None
                                                       else torch.zeros(w.shape[0]))

    @classmethod
    def from_float(cls, module: nn.RNNBase, dtype: torch.dtype = torch.qint8,
                   reduce_range: bool | None = None, first_input_fp16: bool = True) -> "DynamicRNN":
        return cls(module, dtype, reduce_range, first_input_fp16)

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.bidirectional else [])

    def _cells(self) -> list[torch.ScriptObject]:
        """Cell parameters for PyTorch's RNN kernels (cheap wrappers around the packed weights)."""
        cells = []
        for i in range(0, len(self._packed), 2):
            (ih_name, ih, ih_dtype), (hh_name, hh, hh_dtype) = self._packed[i], self._packed[i + 1]
            if ih_dtype == hh_dtype == torch.float16:
                cells.append(_q.make_quantized_cell_params_fp16(ih, hh))
            else:  # int8 (possibly mixed with an fp16 input projection): dynamic kernels on both
                cells.append(_q.make_quantized_cell_params_dynamic(
                    ih, hh, self._biases[ih_name], self._biases[hh_name], self.reduce_range))
        return cells

    def _kernel_dtype(self) -> torch.dtype:
        kinds = {d for _, _, d in self._packed}
        return torch.float16 if kinds == {torch.float16} else torch.qint8

    def fxopt_weights(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, packed, dtype in self._packed:
            w, b = unpack_linear(packed, dtype)
            out[f"weight_{name}"] = w
            if self.bias and b is not None:
                out[f"bias_{name}"] = b
        return out

    def _state_tensors(self) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {}
        for name, packed, dtype in self._packed:
            out[f"weight_{name}"] = unpack_linear(packed, dtype)[0]
            out[f"bias_{name}"] = self._biases[name]
        return out

    def _set_state_tensors(self, tensors: dict[str, torch.Tensor | None]) -> None:
        packed = []
        for name, old, dtype in self._packed:
            weight, bias = tensors[f"weight_{name}"], tensors[f"bias_{name}"]
            store = torch.qint8 if weight.is_quantized else torch.float16
            if tuple(weight.shape) != tuple(unpack_linear(old, dtype)[0].shape):
                raise ValueError(f"weight_{name} has shape {tuple(weight.shape)}, this layer needs "
                                 f"{tuple(unpack_linear(old, dtype)[0].shape)}")
            packed.append((name, pack_stored(weight, bias if self.bias else None), store))
            self._biases[name] = bias.detach().float().clone()
        self._packed = packed

    # fxopt.save / fxopt.load: the stored weights (int8 or fp16, per matrix) as plain data, packed again on load
    _CONFIG = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional", "reduce_range")

    def fxopt_state(self) -> dict:
        matrices = []
        for name, packed, store in self._packed:
            weight = unpack_linear(packed, store)[0]
            matrices.append({"name": name, "store": dtype_name(store), "bias": self._biases[name],
                             "weight": qtensor_state(weight) if store == torch.qint8 else weight})
        return {**{k: getattr(self, k) for k in self._CONFIG}, "dtype": dtype_name(self.dtype), "matrices": matrices}

    @classmethod
    def fxopt_from_state(cls, state: dict) -> "DynamicRNN":
        module = cls.__new__(cls)
        QuantizedModule.__init__(module)
        for key in cls._CONFIG:
            setattr(module, key, state[key])
        module.dtype = dtype_from_name(state["dtype"])
        _check_dtype(module.dtype)
        module._packed, module._biases = [], {}
        for entry in state["matrices"]:
            store = dtype_from_name(entry["store"])
            weight = qtensor_from_state(entry["weight"]) if store == torch.qint8 else entry["weight"]
            bias = entry["bias"]
            module._packed.append((entry["name"], pack_stored(weight, bias if module.bias else None), store))
            module._biases[entry["name"]] = bias
        return module

    # -- running ---------------------------------------------------------------------------------

    def _zeros(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        dirs = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * dirs, batch, self.hidden_size, dtype=torch.float32, device=like.device)

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        unbatched = not packed and input.dim() == 2
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
            x = data.float()
        else:
            sorted_indices = unsorted_indices = None
            x = input.float().unsqueeze(0 if self.batch_first else 1) if unbatched else input.float()
            batch = x.shape[0 if self.batch_first else 1]
        states = self._initial_states(hx, batch, x, unbatched, sorted_indices)
        out, states = self._run(x, batch_sizes if packed else None, states)
        if packed:
            states = tuple(s.index_select(1, unsorted_indices) if unsorted_indices is not None else s
                           for s in states)
            result = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
        else:
            result = out.squeeze(0 if self.batch_first else 1) if unbatched else out
            if unbatched:
                states = tuple(s.squeeze(1) for s in states)
        return result, self._pack_states(states)

    def _initial_states(self, hx, batch, x, unbatched, sorted_indices) -> tuple[torch.Tensor, ...]:
        if hx is None:
            n = 2 if self.mode == "LSTM" else 1
            return tuple(self._zeros(batch, x) for _ in range(n))
        states = tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)
        states = tuple(s.float().unsqueeze(1) if unbatched else s.float() for s in states)
        if sorted_indices is not None:
            states = tuple(s.index_select(1, sorted_indices) for s in states)
        return states

    def _pack_states(self, states):
        return states if self.mode == "LSTM" else states[0]

    def _run(self, x, batch_sizes, states):  # pragma: no cover - overridden
        raise TypeError("use DynamicLSTM or DynamicGRU")

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, batch_first={self.batch_first}, dtype={self.dtype}")


class DynamicLSTM(DynamicRNN):
    """``nn.LSTM`` with per-gate-row int8 (or fp16) weights and dynamically quantized activations."""

    mode = "LSTM"

    def _run(self, x, batch_sizes, states):
        h0, c0 = states
        args = (self._cells(), True, self.num_layers, 0.0, False, self.bidirectional)
        kw = dict(dtype=self._kernel_dtype(), use_dynamic=True)
        if batch_sizes is not None:
            out, h, c = torch.quantized_lstm(x, batch_sizes, [h0, c0], *args, **kw)
        else:
            out, h, c = torch.quantized_lstm(x, [h0, c0], *args, self.batch_first, **kw)
        return out, (h, c)


class DynamicGRU(DynamicRNN):
    """``nn.GRU`` with per-gate-row int8 (or fp16) weights and dynamically quantized activations."""

    mode = "GRU"

    def _run(self, x, batch_sizes, states):
        (h0,) = states
        args = (self._cells(), True, self.num_layers, 0.0, False, self.bidirectional)
        if batch_sizes is not None:
            out, h = torch.quantized_gru(x, batch_sizes, h0, *args)
        else:
            out, h = torch.quantized_gru(x, h0, *args, self.batch_first)
        return out, (h,)
