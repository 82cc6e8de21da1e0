"""``remove-identities``: drop operations that return their input unchanged in eval mode.

Removed (every use of the op is rewired to its input):

* ``nn.Identity``;
* dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``) whose
  ``training`` flag is False, and ``F.dropout*``/``torch.dropout`` called with ``training=False``. A dropout
  in training mode is *not* a no-op: it is kept and a note says so. The same for torchvision's stochastic
  depth (``torchvision.ops.stochastic_depth`` called with ``training=False`` or ``p=0``, and the
  ``StochasticDepth`` module in eval mode), which efficientnet and convnext call in every block;
* ``x * 1``, ``1 * x``, ``x + 0``, ``0 + x``, ``x - 0``, ``x / 1`` (operators, ``torch.mul/add/sub/div``
  and the tensor methods) when the constant is a Python scalar and the result has ``x``'s dtype: a float
  ``x`` with any 0/1 literal, an integer ``x`` with an ``int`` literal except for ``/`` (``int_tensor * 1.0``
  and ``int_tensor / 1`` become float, ``bool_tensor + 0`` becomes int64, so those stay). The dtype comes
  from shape metadata or, without it, from the producer (a module with floating parameters, a
  float-preserving op of a float value). A tensor constant (``get_attr``) of zeros/ones qualifies only
  when shape metadata proves it neither broadcasts ``x`` to a larger shape nor promotes its dtype;
* ``reshape``/``view`` whose recorded input and output shapes are equal (``fxopt.meta.shape_of``), and
  ``flatten`` over at most one dimension (decided by the input's rank);
* ``contiguous()`` of a value whose recorded memory format is already contiguous.

An op whose result is written in place by a later op (``relu_``, ``nn.ReLU(inplace=True)``, also
through a view) is kept when its input has other readers or is a graph input/model attribute: removing
the copy would let the write reach them. Likewise when the input itself is written in place.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from fxopt import Pass, PassResult
from fxopt import meta
from fxopt.graph_utils import (bind_args, bypass_node, delete_if_unreferenced, get_attr_path, has_mutating_user,
                               module_of)

__all__ = ["RemoveIdentities"]

logger = logging.getLogger(__name__)

_DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                    torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                      torch.dropout}


try:  # torchvision is a dependency, but keep the pass usable without it
    from torchvision.ops import StochasticDepth as _StochasticDepth
    from torchvision.ops import stochastic_depth as _stochastic_depth
except ImportError:  # pragma: no cover
    _StochasticDepth = _stochastic_depth = None


def _torch_dropout(input, p, train):  # the signature of the builtin ``torch.dropout``
    pass

# (function or method name) -> (neutral constant, whether the constant may come first)
_ARITH = {
    operator.mul: (1, True), torch.mul: (1, True), "mul": (1, False),
    operator.add: (0, True), torch.add: (0, True), "add": (0, False),
    operator.sub: (0, False), torch.sub: (0, False), "sub": (0, False),
    operator.truediv: (1, False), torch.div: (1, False), "div": (1, False),
}
_FLOAT_PRESERVING = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.sigmoid, torch.tanh, F.gelu, F.silu,
                     F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.flatten,
                     operator.getitem, torch.cat}
_FLOAT_PRESERVING_METHODS = {"relu", "sigmoid", "tanh", "view", "reshape", "flatten", "contiguous", "permute",
                             "transpose", "mean", "sum"}


def _bind(fn: Any, node: torch.fx.Node) -> dict | None:
    try:
        return bind_args(fn, node)
    except TypeError:
        return None


def _dtype(node: Any, depth: int = 0) -> torch.dtype | None:
    """The dtype of ``node``'s value when known: metadata first, then a look at its producer."""
    if not isinstance(node, torch.fx.Node) or depth > 8:
        return None
    known = meta.dtype_of(node)
    if known is not None:
        return known
    if node.op == "call_module":
        module = module_of(node.graph.owning_module, node)
        floats = [p.dtype for p in module.parameters(recurse=True) if p.is_floating_point()]
        if floats and isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.Linear,
                                          torch.nn.modules.batchnorm._BatchNorm)):
            return floats[0]
        if isinstance(module, (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Identity, torch.nn.Flatten,
                               torch.nn.MaxPool2d, torch.nn.AdaptiveAvgPool2d) + _DROPOUT_MODULES) and node.args:
            return _dtype(node.args[0], depth + 1)
        return None
    if (node.op == "call_function" and node.target in _FLOAT_PRESERVING) or (
        node.op == "call_method" and node.target in _FLOAT_PRESERVING_METHODS
    ):
        first = node.args[0] if node.args else None
        if isinstance(first, (list, tuple)) and first:
            first = first[0]
        found = _dtype(first, depth + 1)
        return found if found is not None and found.is_floating_point else None
    return None


def _neutral_scalar(value: Any, neutral: int, x: torch.fx.Node, division: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != neutral:
        return False
    dtype = _dtype(x)
    if dtype is None or dtype == torch.bool:
        return False
    if dtype.is_floating_point or dtype.is_complex:
        return True
    # int tensor: an int literal keeps the dtype, a float one does not; true division always gives float
    return isinstance(value, int) and not division


def _neutral_constant(gm: torch.fx.GraphModule, const: torch.fx.Node, neutral: int, x: torch.fx.Node,
                      division: bool) -> bool:
    if const.op != "get_attr":
        return False
    value = get_attr_path(gm, const.target)
    x_shape, x_dtype = meta.shape_of(x), meta.dtype_of(x)
    if not isinstance(value, torch.Tensor) or x_shape is None or x_dtype is None:
        return False
    if division and not x_dtype.is_floating_point:
        return False
    if not bool((value == neutral).all()) or torch.promote_types(x_dtype, value.dtype) != x_dtype:
        return False
    try:
        return tuple(torch.broadcast_shapes(tuple(x_shape), tuple(value.shape))) == tuple(x_shape)
    except RuntimeError:
        return False


def _identity_input(gm: torch.fx.GraphModule, node: torch.fx.Node, notes: list[str]) -> torch.fx.Node | None:
    """The node whose value ``node`` returns unchanged, or None."""
    if node.op == "call_module":
        module = module_of(gm, node)
        if isinstance(module, torch.nn.Identity) and len(node.args) >= 1 and not node.kwargs:
            return node.args[0]
        if isinstance(module, _DROPOUT_MODULES):
            if module.training:
                notes.append(f"{node.name}: {node.target} ({type(module).__name__}) kept, it is in training mode "
                             "(call model.eval() first to drop it)")
                return None
            return node.args[0] if node.args else node.kwargs.get("input")
        if _StochasticDepth is not None and isinstance(module, _StochasticDepth) and not module.training:
            return node.args[0] if node.args else node.kwargs.get("input")
        if isinstance(module, torch.nn.Flatten) and node.args:
            return _flatten_noop(node.args[0], module.start_dim, module.end_dim)
        return None
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        args = _bind(_torch_dropout if node.target is torch.dropout else node.target, node)
        if args is None:
            return None
        training = args.get("training", args.get("train"))
        if training is not False:
            notes.append(f"{node.name}: {getattr(node.target, '__name__', node.target)} kept, called with "
                         f"training={training!r}")
            return None
        return args.get("input")
    if node.op == "call_function" and _stochastic_depth is not None and node.target is _stochastic_depth:
        args = _bind(_stochastic_depth, node)
        if args is None:
            return None
        if args.get("training", True) is not False and args.get("p") != 0:
            notes.append(f"{node.name}: stochastic_depth kept, called with training={args.get('training', True)!r}")
            return None
        return args.get("input")
    key = node.target if node.op in ("call_function", "call_method") else None
    if key in _ARITH and (node.op == "call_method") == isinstance(key, str):
        return _arith_identity(gm, node, *_ARITH[key])
    if ((node.op == "call_function" and node.target is torch.flatten)
            or (node.op == "call_method" and node.target == "flatten")) and node.args:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return _flatten_noop(node.args[0], start, end)
    if (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target is torch.reshape
    ):
        x = node.args[0] if node.args else None
        if isinstance(x, torch.fx.Node) and meta.shape_of(x) is not None and meta.shape_of(x) == meta.shape_of(node):
            return x if _rank_preserving_without_inferred_dim(node, len(meta.shape_of(x))) else None
        return None
    if node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1 and not node.kwargs:
        tm = meta.tensor_meta(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        if tm is not None and getattr(tm, "memory_format", None) == torch.contiguous_format:
            return node.args[0]
    return None


def _arith_identity(gm, node, neutral, commutes) -> torch.fx.Node | None:
    if set(node.kwargs) - {"alpha"} or len(node.args) != 2:
        return None
    if neutral == 1 and "alpha" in node.kwargs:
        return None
    candidates = [(node.args[0], node.args[1])]
    if commutes:
        candidates.append((node.args[1], node.args[0]))
    division = node.target in (operator.truediv, torch.div, "div")
    for x, const in candidates:
        if not isinstance(x, torch.fx.Node):
            continue
        if isinstance(const, torch.fx.Node):
            if _neutral_constant(gm, const, neutral, x, division):
                return x
        elif _neutral_scalar(const, neutral, x, division):
            return x
    return None


def _rank_preserving_without_inferred_dim(node: torch.fx.Node, rank: int) -> bool:
    """Equal example shapes prove a no-op only for inputs of the example's rank. A target with ``-1``
    (``x.view(-1, x.size(-1))``) or another number of dims than the input reshapes inputs of another rank
    (a 3-D batch through a layer traced on 2-D examples), so such a reshape stays."""
    dims = list(node.args[1:]) if node.op == "call_method" else list(node.args[1:2])
    for key in ("shape", "size"):
        if key in node.kwargs:
            dims = [node.kwargs[key]]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    if len(dims) == 1 and isinstance(dims[0], torch.fx.Node) and _is_whole_shape_of(dims[0], node.args[0]):
        return True  # x.reshape(x.shape) / x.view(x.size())
    return len(dims) == rank and not any(isinstance(d, int) and d == -1 for d in dims)


def _is_whole_shape_of(dims: torch.fx.Node, x: Any) -> bool:
    if dims.op == "call_function" and dims.target is getattr and dims.args == (x, "shape"):
        return True
    return dims.op == "call_method" and dims.target == "size" and dims.args == (x,) and not dims.kwargs


def _flatten_noop(x: Any, start: Any, end: Any) -> torch.fx.Node | None:
    shape = meta.shape_of(x) if isinstance(x, torch.fx.Node) else None
    if shape is None or not isinstance(start, int) or not isinstance(end, int):
        return None
    rank = len(shape)
    if rank == 0:
        return None  # flatten of a 0-d tensor gives a 1-d one
    start, end = start % rank, end % rank
    return x if end <= start else None


@dataclass(frozen=True)
class RemoveIdentities(Pass):
    """Drop eval-mode no-ops: Dropout, Identity, ``x * 1``, ``x + 0``, no-op reshapes."""

    name = "remove-identities"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        notes: list[str] = []
        stats: dict[str, int] = {}
        touched_modules: list[str] = []
        for node in list(gm.graph.nodes):
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            source = _identity_input(gm, node, notes)
            if not isinstance(source, torch.fx.Node):
                continue
            if _unsafe_alias(node, source):
                notes.append(f"{node.name}: kept, a later in-place op writes into its value or its input")
                continue
            kind = _kind(gm, node)
            touched_modules += bypass_node(gm, node, source)
            stats[kind] = stats.get(kind, 0) + 1
        for target in dict.fromkeys(touched_modules):
            delete_if_unreferenced(gm, target)
        modified = bool(stats)
        if modified:
            gm.graph.lint()
            gm.recompile()
        logger.debug("remove-identities: %s", stats)
        return PassResult(gm, modified, stats, notes)


def _unsafe_alias(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """Whether reading ``source`` instead of ``node`` would let an in-place write reach another reader.

    Safe when nothing writes into either value, or when ``node`` is the only reader of ``source`` and
    ``source`` is not a graph input or a model attribute (the write then only ever reached ``node``'s
    readers, which now read ``source``).
    """
    if has_mutating_user(source):
        return True
    if not has_mutating_user(node):
        return False
    return len(source.users) > 1 or source.op in ("placeholder", "get_attr")


def _kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return type(module_of(gm, node)).__name__.lower()
    if node.op == "call_method":
        return str(node.target)
    name = getattr(node.target, "__name__", str(node.target))
    return name.lstrip("_")
