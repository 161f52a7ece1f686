import math

import jax
from jaxtyping import PRNGKeyArray

from gptzoo.models.gpt import GPT, decoder
from gptzoo.nn import GLUMLP, Block, CausalSelfAttention, Llama3Scaling, RMSNorm, Rotary


def llama(
    vocab_size: int, *, n_layers: int, n_heads: int, d_model: int, block_size: int,
    n_kv_heads: int | None = None, head_dim: int | None = None, d_hidden: int | None = None,
    multiple_of: int = 256, rotary_base: float = 10000.0, rope_scaling: dict | None = None,
    norm_eps: float = 1e-6, dropout: float = 0.0, use_bias: bool = False,
    qkv_bias: bool | None = None, tie_head: bool = False, scan_layers: bool = True,
    key: PRNGKeyArray,
) -> GPT:
    """LLaMA (Touvron et al. 2023): RMSNorm, rotary positions, SwiGLU and grouped-query attention.

    `n_kv_heads` key/value heads (default `n_heads`) of `head_dim` channels (default
    `d_model // n_heads`); SwiGLU hidden width `d_hidden` (default
    `llama_hidden_dim(d_model, 4, multiple_of)`); rotary base `rotary_base`, with LLaMA 3.1's
    frequency scaling when `rope_scaling` is `{"rope_type": "llama3", "factor": ...,
    "low_freq_factor": ..., "high_freq_factor": ..., "original_max_position_embeddings": ...}`;
    RMSNorm epsilon `norm_eps`. `qkv_bias=True` with `use_bias=False` is Qwen2's layout. Weights
    start at N(0, 0.02), residual-stream outputs at N(0, 0.02 / sqrt(2 * n_layers)) as in GPT-2.
    `scan_layers`: see `decoder`.
    """
    head_dim = d_model // n_heads if head_dim is None else head_dim
    out_std = 0.02 / math.sqrt(2 * n_layers)
    scaling = None
    if rope_scaling is not None:
        if rope_scaling.get("rope_type") != "llama3":
            raise ValueError(f"rope_scaling of type {rope_scaling.get('rope_type')!r} is not "
                             "implemented; use 'llama3' or None")
        scaling = Llama3Scaling(
            factor=rope_scaling["factor"], low_freq_factor=rope_scaling["low_freq_factor"],
            high_freq_factor=rope_scaling["high_freq_factor"],
            original_context=rope_scaling["original_max_position_embeddings"])

    def block(k: PRNGKeyArray) -> Block:
        attn_key, mlp_key = jax.random.split(k)
        return Block(
            attn_norm=RMSNorm(d_model, eps=norm_eps),
            attention=CausalSelfAttention(
                d_model, n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                positional=Rotary(head_dim, base=rotary_base, scaling=scaling),  # half-split pairs
                dropout=dropout, use_bias=use_bias, qkv_bias=qkv_bias, out_init_std=out_std,
                key=attn_key),
            mlp_norm=RMSNorm(d_model, eps=norm_eps),
            mlp=GLUMLP(d_model, activation="silu", multiple_of=multiple_of, d_hidden=d_hidden,
                       dropout=dropout, use_bias=use_bias, out_init_std=out_std, key=mlp_key),
        )

    return decoder(vocab_size, block=block, n_layers=n_layers, d_model=d_model,
                   block_size=block_size, final_norm=RMSNorm(d_model, eps=norm_eps),
                   positions=None, tie_head=tie_head, dropout=dropout,
                   scan_layers=scan_layers, key=key)
