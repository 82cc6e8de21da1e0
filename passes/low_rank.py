"""``low-rank``: replace Linear and Conv2d layers by two thinner ones from a truncated SVD.

- ``Linear(I, O)`` -> ``Linear(I, r, bias=False)`` then ``Linear(r, O)``: ``W ≈ (U_r √S_r)(√S_r V_rᵀ)``.
- ``Conv2d(I, O, k)`` (``groups=1``), ``scheme="channel"`` -> ``Conv2d(I, r, k)`` with the layer's
  stride/padding/dilation, then a 1×1 ``Conv2d(r, O)``: the SVD of the weight reshaped to ``[O, I·kh·kw]``.
- ``Conv2d``, ``scheme="spatial"`` (AIMET's spatial SVD) -> a vertical ``Conv2d(I, r, (kh, 1))`` then a
  horizontal ``Conv2d(r, O, (1, kw))`` (stride, padding and dilation split by axis): the SVD of the weight
  permuted to ``[I, kh, O, kw]`` and reshaped to ``M = [I·kh, O·kw]``. With ``M ≈ A B`` (``A = U_r √S_r``,
  ``B = √S_r V_rᵀ``) the vertical kernel is ``V[j, i, y] = A[(i, y), j]`` and the horizontal one
  ``H[o, j, x] = B[j, (o, x)]``; their composition is the kernel ``Σ_j H[o, j, x] V[j, i, y] = (A B)[(i, y), (o, x)]``,
  exact at full rank ``min(I·kh, O·kw)``. Linear layers always use the channel scheme.

The rank comes from ``rank`` (the same for every layer), ``rank_ratio`` (the factorized layer keeps that
fraction of the weight parameters: for the ``m×n`` matrix factorized, ``r = ⌊ratio·m·n / (m + n)⌋``) or ``energy`` (the smallest ``r`` whose
singular values keep that fraction of ``Σ s²``). With none of them: ``rank_ratio=0.5``. By Eckart–Young the
relative Frobenius error of the weight is ``sqrt(Σ_{i>r} s_i² / Σ s_i²)``. Layers where factorizing would
not reduce the parameter count are skipped with a note. A ``rank`` above a layer's full rank is a
``ValueError``.

The layer is stored as ``nn.Sequential(first, second)`` under its old name; in the graph, each call of it
becomes two calls (``name.0``, ``name.1``) so later passes (quantization) see two plain layers. Layers
inside untraced leaves are replaced too (module-level pass).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from fxopt import Pass, PassResult

from ._compress import check_fraction, describe_selection, freeze_selection, select_layers
from fxopt.graph_utils import set_attr_path

__all__ = ["LowRankFactorize", "factorize", "choose_rank", "weight_matrix", "SCHEMES"]

logger = logging.getLogger(__name__)


def choose_rank(singular: torch.Tensor, out_dim: int, in_dim: int, *, rank: int | None, rank_ratio: float | None,
                energy: float | None) -> int:
    """The rank for one layer (see the module docstring)."""
    if rank is not None:
        return rank
    if energy is not None:
        e = singular.double() ** 2
        frac = torch.cumsum(e, 0) / e.sum().clamp(min=1e-300)
        return int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype) - 1e-12)) + 1
    return max(1, math.floor(rank_ratio * out_dim * in_dim / (out_dim + in_dim)))


SCHEMES = ("channel", "spatial")


def weight_matrix(layer: nn.Module, scheme: str = "channel") -> torch.Tensor:
    """The matrix whose truncated SVD ``factorize`` uses (see the module docstring), in float64."""
    weight = layer.weight.detach().double()
    if scheme == "spatial" and isinstance(layer, nn.Conv2d):
        out_ch, in_ch, kh, kw = weight.shape
        return weight.permute(1, 2, 0, 3).reshape(in_ch * kh, out_ch * kw)
    return weight.reshape(weight.shape[0], -1)


def factorize(layer: nn.Module, r: int, scheme: str = "channel") -> nn.Sequential:
    """Two layers whose product is the rank-``r`` truncated SVD of ``layer``'s weight (``scheme``: see above)."""
    weight = layer.weight.detach()
    out_dim = weight.shape[0]
    u, s, vh = torch.linalg.svd(weight_matrix(layer, scheme), full_matrices=False)
    root = s[:r].sqrt()
    left = u[:, :r] * root[None]  # rows x r
    right = root[:, None] * vh[:r]  # r x cols
    has_bias = layer.bias is not None
    kw = dict(device=weight.device, dtype=weight.dtype)
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, r, bias=False, **kw)
        second = nn.Linear(r, out_dim, bias=has_bias, **kw)
        first_w, second_w = right, left
    elif scheme == "spatial":
        _, in_ch, k_h, k_w = weight.shape
        padding = layer.padding if isinstance(layer.padding, str) else (layer.padding[0], 0)
        first = nn.Conv2d(in_ch, r, (k_h, 1), stride=(layer.stride[0], 1), padding=padding,
                          dilation=(layer.dilation[0], 1), bias=False, **kw)
        padding = layer.padding if isinstance(layer.padding, str) else (0, layer.padding[1])
        second = nn.Conv2d(r, out_dim, (1, k_w), stride=(1, layer.stride[1]), padding=padding,
                           dilation=(1, layer.dilation[1]), bias=has_bias, **kw)
        first_w = left.T.reshape(r, in_ch, k_h, 1)  # V[j, i, y] = A[(i, y), j]
        second_w = right.reshape(r, out_dim, 1, k_w).transpose(0, 1)  # H[o, j, x] = B[j, (o, x)]
    else:
        first = nn.Conv2d(layer.in_channels, r, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode, **kw)
        second = nn.Conv2d(r, out_dim, 1, bias=has_bias, **kw)
        first_w, second_w = right, left
    first.weight.data.copy_(first_w.reshape(first.weight.shape).to(weight.dtype))
    second.weight.data.copy_(second_w.reshape(second.weight.shape).to(weight.dtype))
    if has_bias:
        second.bias.data.copy_(layer.bias.detach())
    seq = nn.Sequential(first, second)
    seq.train(layer.training)
    return seq


@dataclass(frozen=True)
class LowRankFactorize(Pass):
    """Truncated-SVD factorization of Linear and Conv2d layers."""

    name = "low-rank"
    swaps_modules: ClassVar[bool] = True  # only replaces layers: compile may return the eager model (fxopt.compress.eager)
    module_level: ClassVar[bool] = True

    rank_ratio: float | None = None
    energy: float | None = None
    rank: int | None = None
    scheme: str = "channel"
    include: tuple = ()
    exclude: tuple = ()

    def __post_init__(self) -> None:
        given = [n for n in ("rank_ratio", "energy", "rank") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of rank_ratio, energy, rank (got {', '.join(given)})")
        if self.rank_ratio is not None:
            check_fraction(self.rank_ratio, "rank_ratio", "the fraction of parameters kept", zero_ok=False, one_ok=True)
        if self.energy is not None:
            check_fraction(self.energy, "energy", "the fraction of sum(s^2) kept", zero_ok=False, one_ok=True)
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        freeze_selection(self)

    def call(self, gm: torch.nn.Module) -> PassResult:
        return PassResult(gm, *self.apply(gm))

    def apply(self, root: torch.nn.Module) -> tuple[bool, dict, list[str]]:
        ratio = self.rank_ratio if (self.rank_ratio, self.energy, self.rank) != (None, None, None) else 0.5
        layers, notes = select_layers(root, self.include, self.exclude, types=(nn.Linear, nn.Conv2d))
        layers = [(n, m) for n, m in layers if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not layers:
            return False, {"layers": 0}, notes + [f"nothing to factorize: {describe_selection(self.include, (nn.Linear, nn.Conv2d))}"]
        graph_reads = _graph_reads(root)
        done, before, after = 0, 0, 0
        for name, layer in layers:
            matrix = weight_matrix(layer, self.scheme)
            out_dim, in_dim = matrix.shape
            full = min(out_dim, in_dim)
            if self.rank is not None and self.rank > full:
                raise ValueError(f"rank={self.rank} is larger than the full rank {full} of {name} "
                                 f"(weight {tuple(layer.weight.shape)}, scheme {self.scheme!r}); "
                                 f"use rank <= {full} or exclude={name!r}")
            why = _why_not(root, name, layer, graph_reads, self.scheme)
            if why:
                notes.append(f"{name}: not factorized, {why}")
                continue
            s = torch.linalg.svdvals(matrix)
            r = choose_rank(s, out_dim, in_dim, rank=self.rank, rank_ratio=ratio, energy=self.energy)
            if r * (out_dim + in_dim) >= out_dim * in_dim:
                notes.append(f"{name}: not factorized, rank {r} of a {out_dim}x{in_dim} weight would not reduce "
                             f"parameters ({r * (out_dim + in_dim)} >= {out_dim * in_dim})")
                continue
            set_attr_path(root, name, factorize(layer, r, self.scheme))
            if isinstance(root, torch.fx.GraphModule):
                _split_calls(root, name)
            before += out_dim * in_dim
            after += r * (out_dim + in_dim)
            done += 1
        if done and isinstance(root, torch.fx.GraphModule):
            root.graph.lint()
            root.recompile()
        stats = {"layers": done, "weight_params_before": before, "weight_params_after": after}
        return done > 0, stats, notes


def _graph_reads(root: nn.Module) -> set[str]:
    if not isinstance(root, torch.fx.GraphModule):
        return set()
    return {n.target for n in root.graph.nodes if n.op == "get_attr" and isinstance(n.target, str)}


# Parents whose forward reads a child Linear's weight itself (F.multi_head_attention_forward, the encoder and
# decoder layers' fast path) instead of calling it: a factorized child would break them.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _why_not(root: nn.Module, name: str, layer: nn.Module, graph_reads: set[str], scheme: str) -> str:
    if scheme == "spatial" and isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} does not split into a vertical and a horizontal padding"
    parent = root.get_submodule(name.rpartition(".")[0]) if "." in name else None
    if isinstance(parent, _READS_CHILD_WEIGHTS):
        return (f"{type(parent).__name__} reads its weight and bias directly (fused attention / fast-path "
                "kernels); quantize it with dynamic int8 instead")
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return f"grouped convolution (groups={layer.groups})"
    if parametrize.is_parametrized(layer):
        return "it has parametrizations (masks or clusters: run fp.ApplyMasks() first)"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return "it has forward hooks"
    if any(t == name or t.startswith(name + ".") for t in graph_reads):
        return "the graph reads its parameters directly"
    return ""


def _split_calls(gm: torch.fx.GraphModule, name: str) -> None:
    """Each ``call_module(name)`` becomes ``call_module(name.0)`` -> ``call_module(name.1)``."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == name:
            with gm.graph.inserting_after(node):
                first = gm.graph.call_module(f"{name}.0", node.args, dict(node.kwargs))
            with gm.graph.inserting_after(first):
                second = gm.graph.call_module(f"{name}.1", (first,))
            first.meta = {}
            second.meta = dict(node.meta)
            node.replace_all_uses_with(second)
            gm.graph.erase_node(node)
