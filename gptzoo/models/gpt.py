import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn import (
    MLP, Block, CausalSelfAttention, Embedding, LayerNorm, Linear, PositionalEmbedding,
)
from gptzoo.nn._typecheck import typecheck


class GPT(eqx.Module):
    """A decoder-only language model: embeddings, a stack of blocks, a final norm and a head.

    It composes whatever parts it is given; `gpt2(...)` below builds the classic layout.
    `head=None` ties the output head to the token embedding.
    """

    token_embedding: Embedding
    position_embedding: PositionalEmbedding | None
    blocks: tuple[eqx.Module, ...]
    final_norm: eqx.Module
    head: Linear | None
    embed_dropout: eqx.nn.Dropout
    block_size: int = eqx.field(static=True)

    @typecheck
    def __call__(
        self, tokens: Int[Array, "*batch seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq vocab"]:
        """Next-token logits at every position of one sequence or a batch of them.

        Dropout is active only when `key` is given.
        """
        keys = jax.random.split(key, len(self.blocks) + 1) if key is not None else None
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(jnp.arange(tokens.shape[-1]))
        x = self.embed_dropout(x, key=None if keys is None else keys[-1], inference=key is None)
        for i, block in enumerate(self.blocks):
            x = block(x, key=None if keys is None else keys[i])
        x = self.final_norm(x)
        return self.token_embedding.unembed(x) if self.head is None else self.head(x)


def gpt2(
    vocab_size: int, *, n_layers: int, n_heads: int, d_model: int, block_size: int,
    dropout: float = 0.0, use_bias: bool = True, tie_head: bool = True, key: PRNGKeyArray,
) -> GPT:
    """GPT-2: learned positions, LayerNorm, GELU MLP, pre-norm blocks, scaled residual init."""
    tok_key, pos_key, head_key, *block_keys = jax.random.split(key, n_layers + 3)
    # GPT-2 scales the init of each residual-stream output by 1/sqrt(2 * n_layers).
    out_std = 0.02 / math.sqrt(2 * n_layers)

    def block(k: PRNGKeyArray) -> Block:
        attn_key, mlp_key = jax.random.split(k)
        return Block(
            attn_norm=LayerNorm(d_model, use_bias=use_bias),
            attention=CausalSelfAttention(
                d_model, n_heads, dropout=dropout, use_bias=use_bias, out_init_std=out_std,
                key=attn_key,
            ),
            mlp_norm=LayerNorm(d_model, use_bias=use_bias),
            mlp=MLP(d_model, dropout=dropout, use_bias=use_bias, out_init_std=out_std, key=mlp_key),
        )

    return GPT(
        token_embedding=Embedding(vocab_size, d_model, key=tok_key),
        position_embedding=PositionalEmbedding(block_size, d_model, key=pos_key),
        blocks=tuple(block(k) for k in block_keys),
        final_norm=LayerNorm(d_model, use_bias=use_bias),
        head=None if tie_head else Linear(d_model, vocab_size, use_bias=False, key=head_key),
        embed_dropout=eqx.nn.Dropout(dropout),
        block_size=block_size,
    )
