"""Components: one idea per module, each an `eqx.Module` over a single example."""

from gptzoo.nn.alibi import ALiBi, alibi_slopes
from gptzoo.nn.attention import attend, causal_attend, causal_mask
from gptzoo.nn.block import Block
from gptzoo.nn.cross_attention import CausalCrossAttention
from gptzoo.nn.decoding import CachedBlock, MixesPositions
from gptzoo.nn.embedding import Embedding, PositionalEmbedding
from gptzoo.nn.experts import Experts
from gptzoo.nn.glu import GLUMLP, llama_hidden_dim
from gptzoo.nn.head_qk import HeadQK
from gptzoo.nn.linear import Linear
from gptzoo.nn.lora import LoRALinear
from gptzoo.nn.memory_kv import MemoryKVAttention
from gptzoo.nn.mlp import MLP
from gptzoo.nn.moe import MoEMLP, RouterStats, load_balancing_loss, route
from gptzoo.nn.moe_block import MoEBlock
from gptzoo.nn.norm import LayerNorm
from gptzoo.nn.parallel_block import ParallelBlock
from gptzoo.nn.rmsnorm import RMSNorm
from gptzoo.nn.rotary import Llama3Scaling, Rotary
from gptzoo.nn.rowwise import rowwise_layout
from gptzoo.nn.self_attention import CausalSelfAttention
from gptzoo.nn.sgu import SGUMLP, SpatialGatingUnit
from gptzoo.nn.stack import Stack, stacked, unstacked, with_scan_settings
from gptzoo.nn.talking_heads import TalkingHeadsAttention
from gptzoo.nn.token_shift import TokenShift

__all__ = [
    "MLP", "Block", "CausalSelfAttention", "Embedding", "LayerNorm", "Linear", "LoRALinear",
    "PositionalEmbedding", "attend", "causal_attend", "causal_mask",
    "GLUMLP", "HeadQK", "ParallelBlock", "RMSNorm", "SGUMLP", "SpatialGatingUnit",
    "llama_hidden_dim",
    "ALiBi", "Llama3Scaling", "Rotary", "alibi_slopes",
    "CausalCrossAttention",
    "MemoryKVAttention", "TalkingHeadsAttention", "TokenShift",
    "Experts", "MoEBlock", "MoEMLP", "RouterStats", "load_balancing_loss", "route",
    "CachedBlock", "MixesPositions",
    "Stack", "stacked", "unstacked", "with_scan_settings",
    "rowwise_layout",
]
