"""Components: one idea per module, each an `eqx.Module` over a single example."""

from gptzoo.nn.attention import CausalSelfAttention, attend, causal_mask
from gptzoo.nn.block import Block
from gptzoo.nn.embedding import Embedding, PositionalEmbedding
from gptzoo.nn.linear import Linear
from gptzoo.nn.mlp import MLP
from gptzoo.nn.norm import LayerNorm

__all__ = [
    "MLP", "Block", "CausalSelfAttention", "Embedding", "LayerNorm", "Linear",
    "PositionalEmbedding", "attend", "causal_mask",
]
