"""Backend lowerers, one per file, found by name through fxopt's registry (imported lazily).

``available()`` lists the names; ``get(name)`` returns the backend object. Third-party backends
register through the ``fxopt.backends`` entry-point group (``name = "package.module:BackendClass"``).
"""

from __future__ import annotations

from fxopt.registry import Backend, Support, available, get, register

__all__ = ["Backend", "Support", "available", "get", "register", "OnnxBackend", "OpenVinoBackend", "EdgeTpuBackend",
           "TFLiteBackend", "X86Backend", "QnnpackBackend", "X86InductorBackend"]

# backend classes with options, imported on first use: fxopt.backends.OpenVinoBackend(threads=2)
_LAZY_CLASSES = {"OnnxBackend": "fxopt.backends.onnx", "OpenVinoBackend": "fxopt.backends.openvino",
                 "EdgeTpuBackend": "fxopt.backends.edgetpu", "TFLiteBackend": "fxopt.backends.tflite",
                 "X86Backend": "fxopt.backends.x86", "QnnpackBackend": "fxopt.backends.qnnpack",
                 "X86InductorBackend": "fxopt.backends.x86_inductor"}


def __getattr__(name: str):
    if name in _LAZY_CLASSES:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_LAZY_CLASSES[name]), name)
    raise AttributeError(f"module 'fxopt.backends' has no attribute {name!r}")
