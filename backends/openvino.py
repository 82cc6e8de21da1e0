"""The ``openvino`` backend: fxopt graphs as OpenVINO IR (``.xml`` + ``.bin``), run in the OpenVINO runtime.

The IR is converted from fxopt's own ONNX export (:func:`fxopt.backends.onnx.export_onnx`), so every
graph kind the ``onnx`` backend handles works here too:

* float / FP16 graphs: the IR's weights are **FP16-compressed by default** (``compress_to_fp16=True``:
  the ``.bin`` is about half the fp32 size; the CPU plugin upcasts them and computes in fp32). This FP16
  IR, with static shapes (``OpenVinoBackend(static_shapes=True)``), is what MyriadX blob compilation
  (OpenVINO 2022.3's ``compile_tool`` or Luxonis's ``blobconverter``) takes, see the README;
* static int8: the QDQ pairs with fxopt's calibrated scales become OpenVINO ``FakeQuantize`` ops and the
  CPU plugin's low-precision transformations run the convolutions and MatMuls in int8 (weights stay
  int8 in the ``.bin``). The export is placed for this plugin (``openvino_spec``'s name switches it in the QDQ
  builder): no FakeQuantize between a conv / linear and the activation fused into it as a post-op, and
  near-symmetric activation ranges written symmetric, so they run as s8 without a zero point; in a graph
  prepared for openvino (attention's matmuls int8), q / k / v rounded once on one symmetric grid and the
  scores and softmax probabilities left float, which the plugin runs as its fused int8 attention;
* dynamic int8: ``MatMulInteger`` / ``DynamicQuantizeLinear`` as exported.

The returned :class:`OpenVinoModule` compiles the IR for ``"CPU"`` with ``threads`` inference threads
(``torch.get_num_threads()`` read at lowering unless ``OpenVinoBackend(threads=n)``) and inference
precision ``f32`` (so an AMX/AVX512-BF16 CPU does not silently run the float parts in bf16; pass
``precision=None`` to let the plugin choose). It takes the original model's arguments and returns its
output structure. ``fxopt.save(module, "m.xml")`` writes the exact IR it runs (``m.xml`` + ``m.bin``).
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fxopt import meta
from fxopt.errors import UnsupportedError

from .lowering import Int8Backend
from .onnx import _bind_inputs, _unflatten, export_onnx, onnx_spec, require
from .spec import BackendSpec

__all__ = ["OpenVinoBackend", "OpenVinoModule", "openvino_spec"]

_RT_KEY = "fxopt_info"


@functools.lru_cache(maxsize=1)
def _core():
    """One OpenVINO ``Core`` per process (creating one costs about half a second)."""
    return require("openvino", "openvino").Core()


def openvino_spec() -> BackendSpec:
    """OpenVINO's CPU int8: u8 activations, s8 symmetric per-channel weights (the ONNX QDQ table)."""
    spec = onnx_spec()
    return BackendSpec(name="openvino", engine=spec.engine, activation=spec.activation, weight=spec.weight,
                       weight_per_tensor=spec.weight_per_tensor, ops=dict(spec.ops),
                       notes=("QDQ → FakeQuantize; the CPU plugin runs conv/MatMul in int8",),
                       max_range_ratio=spec.max_range_ratio)


class OpenVinoModule(nn.Module):
    """Runs an OpenVINO IR on the CPU with the original model's call signature and output structure."""

    def __init__(self, xml: bytes, weights: bytes, threads: int | None = None, precision: str | None = "f32") -> None:
        super().__init__()
        self.ov = require("openvino", "openvino")
        self.xml, self.weights = bytes(xml), bytes(weights)
        self.threads = int(threads) if threads else torch.get_num_threads()
        self.precision = precision
        model = self._read()
        if not model.has_rt_info([_RT_KEY]):
            raise UnsupportedError("this OpenVINO IR was not written by fxopt (no fxopt_info): run it with "
                                   "openvino directly")
        self.info = json.loads(model.get_rt_info([_RT_KEY]).astype(str))
        self.meta: dict = {}
        meta.set_backend(self, "openvino")
        self._compiled = None

    def _read(self):
        import numpy as np  # noqa: PLC0415

        return _core().read_model(model=self.xml.decode(), weights=self.ov.Tensor(np.frombuffer(self.weights, np.uint8)))

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def compiled(self):
        if self._compiled is None:
            config: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1,
                                      "PERFORMANCE_HINT": "LATENCY"}
            if self.precision is not None:
                config["INFERENCE_PRECISION_HINT"] = self.precision
            self._compiled = _core().compile_model(self._read(), "CPU", config)
            self._request = self._compiled.create_infer_request()
        return self._compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        values = _bind_inputs(self.info["inputs"], args, kwargs, "OpenVinoModule")
        compiled = self.compiled
        feed = {name: v.detach().cpu().contiguous().numpy() for name, v in zip(self.info["inputs"], values)}
        result = self._request.infer(feed)
        outs = [torch.from_numpy(result[compiled.output(name)].copy()) for name in self.info["outputs"]]
        return _unflatten(outs, self.info)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("ov", None)
        state["_compiled"] = None
        state.pop("_request", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.ov = require("openvino", "openvino")

    def __deepcopy__(self, memo: dict) -> "OpenVinoModule":
        new = OpenVinoModule(self.xml, self.weights, self.threads, self.precision)
        new.meta = copy.deepcopy(self.meta, memo)
        return new

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, threads={self.threads}, bin_bytes={len(self.weights)}"


class OpenVinoBackend(Int8Backend):
    """``backend="openvino"``: OpenVINO IR (FP16-compressed by default), run on the CPU by OpenVINO."""

    name = "openvino"

    def __init__(self, threads: int | None = None, *, compress_to_fp16: bool = True, static_shapes: bool = False,
                 precision: str | None = "f32") -> None:
        super().__init__(openvino_spec())
        self.threads = threads
        self.compress_to_fp16 = compress_to_fp16
        self.static_shapes = static_shapes
        self.precision = precision

    def accepts_prepared_for(self, backend_name: str) -> bool:
        return backend_name in ("openvino", "onnx", "x86", "qnnpack")

    def lower(self, gm: torch.fx.GraphModule) -> OpenVinoModule:
        ov = require("openvino", "openvino")
        proto, info = export_onnx(gm, self.spec, dynamic_batch=not self.static_shapes)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            onnx_path.write_bytes(proto.SerializeToString())
            model = ov.convert_model(str(onnx_path))
            model.set_rt_info(json.dumps(info), [_RT_KEY])
            xml = Path(tmp) / "model.xml"
            ov.save_model(model, str(xml), compress_to_fp16=self.compress_to_fp16)
            module = OpenVinoModule(xml.read_bytes(), xml.with_suffix(".bin").read_bytes(),
                                    self.threads or torch.get_num_threads(), self.precision)
        meta.set_float_islands(module, meta.float_islands(gm))
        return module

    def save(self, module: nn.Module, path: str | Path) -> None:
        if not isinstance(module, OpenVinoModule):
            raise UnsupportedError(
                f"the openvino backend saves modules it lowered (OpenVinoModule), got {type(module).__name__}; "
                f"lower first: fxopt.compile(model, passes, example_inputs=..., backend='openvino')")
        path = Path(path)
        if path.suffix.lower() != ".xml":
            raise UnsupportedError(f"an OpenVINO IR is saved to a .xml path (its weights go next to it as .bin), "
                                   f"got {str(path)!r}")
        path.write_bytes(module.xml)
        path.with_suffix(".bin").write_bytes(module.weights)

    def load(self, path: str | Path) -> OpenVinoModule:
        path = Path(path)
        bin_path = path.with_suffix(".bin")
        if not bin_path.exists():
            raise FileNotFoundError(f"fxopt.load: the IR {str(path)!r} needs its weights file {str(bin_path)!r}")
        return OpenVinoModule(path.read_bytes(), bin_path.read_bytes(), self.threads, self.precision)

    def __repr__(self) -> str:
        return f"OpenVinoBackend(threads={self.threads}, compress_to_fp16={self.compress_to_fp16})"
