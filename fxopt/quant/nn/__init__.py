"""Every module that runs a model: static int8 modules, the lowered-model wrapper, dynamic int8 and fp16
modules, and the fused float modules. Passes build them, backends lower to them and ``fxopt.io`` rebuilds
them; none of those import one another for it. Imports only ``fxopt.errors`` and ``fxopt.quant``'s math.
"""

from __future__ import annotations

from torch import nn

from .base import DescribesWeights, FusedModule, QuantizedModule
from .dynamic import DynamicEmbedding, DynamicEmbeddingBag, DynamicLinear
from .dynamic_attention import DynamicMultiheadAttention, DynamicTransformerEncoderLayer
from .dynamic_rnn import DynamicGRU, DynamicLSTM, DynamicRNN
from .engine import engine_scope, local_engine
from .fp16 import FP16Module
from .fused import FusedAdd, FusedConv, FusedLinear
from .int8 import QAdd, QBatchNorm, QCat, QConv, QHardswish, QLayerNorm, QLinear, QMul, QuantizeInput
from .model import QuantizedModel
from .onednn import QConvPointwise

__all__ = [
    "DescribesWeights", "DynamicEmbedding", "DynamicEmbeddingBag", "DynamicGRU", "DynamicLSTM", "DynamicLinear",
    "DynamicMultiheadAttention", "DynamicRNN", "DynamicTransformerEncoderLayer", "FP16Module", "FusedAdd",
    "FusedConv", "FusedLinear", "FusedModule", "QAdd", "QBatchNorm", "QCat", "QConv", "QHardswish", "QLayerNorm",
    "QLinear", "QMul", "QuantizeInput", "QuantizedModel", "QuantizedModule", "engine_scope", "local_engine",
    "PLAIN_STORABLE", "STORABLE",
    "QConvPointwise",
]


# the allowlist of classes fxopt.save writes as plain data and fxopt.load rebuilds (explicit on purpose)
STORABLE: tuple[type[QuantizedModule], ...] = (
    QuantizeInput, QConv, QLinear, QAdd, QMul, QCat, QHardswish, QLayerNorm, QBatchNorm,
    DynamicLinear, DynamicEmbedding, DynamicEmbeddingBag, QConvPointwise, DynamicLSTM, DynamicGRU,
)
# fxopt's float modules, stored like torch.nn modules (attributes, parameters, buffers, children) and rebuilt
# without running __init__ (fxopt.io.module_format)
PLAIN_STORABLE: tuple[type[nn.Module], ...] = (FusedConv, FusedLinear, FusedAdd, FP16Module)
