"""fxopt's graph invariants, checked after every modifying pass (on by default)."""

from __future__ import annotations

import torch
import torch.fx

from .errors import VerificationError
from .graph_utils import has_attr_path

__all__ = ["verify"]


def verify(gm: torch.fx.GraphModule, *, pass_name: str = "") -> None:
    """Check ``gm`` is well formed: fx lint, every target exists, one output, code recompiles.

    Raises :class:`VerificationError` naming the first offending node.
    """
    where = f" after pass {pass_name!r}" if pass_name else ""
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises RuntimeError with its own message
        raise VerificationError(f"graph is malformed{where}: {exc}", pass_name=pass_name) from exc

    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise VerificationError(f"graph has {len(outputs)} output nodes{where}; expected 1", pass_name=pass_name)

    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and not has_attr_path(gm, node.target):
            raise VerificationError(
                f"node {node.name!r} ({node.op}) refers to {node.target!r}, which does not exist on the "
                f"module{where}",
                pass_name=pass_name,
            )
        if node.op == "call_module" and not isinstance(gm.get_submodule(node.target), torch.nn.Module):
            raise VerificationError(
                f"node {node.name!r} calls {node.target!r}, which is not an nn.Module{where}", pass_name=pass_name
            )
        if node.op == "call_function" and not callable(node.target):
            raise VerificationError(f"node {node.name!r} has a non-callable target{where}", pass_name=pass_name)
        # Quantize/dequantize pairs: a dequantize must consume something quantized.
        if node.op == "call_method" and node.target == "dequantize":
            src = node.args[0] if node.args else None
            if isinstance(src, torch.fx.Node) and src.op == "placeholder":
                raise VerificationError(
                    f"node {node.name!r} dequantizes a graph input directly{where}", pass_name=pass_name
                )
    try:
        gm.recompile()
    except Exception as exc:
        raise VerificationError(f"graph does not compile to Python{where}: {exc}", pass_name=pass_name) from exc
