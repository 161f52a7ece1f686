"""Perceiver AR (Hawthorne et al. 2022): a long causal context read into a few latents."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.models.config import ArchitectureConfig
from gptzoo.models.gpt import head_logits
from gptzoo.models.registry import Family, register
from gptzoo.nn import (
    MLP,
    Block,
    CausalCrossAttention,
    CausalSelfAttention,
    Embedding,
    LayerNorm,
    Linear,
    PositionalEmbedding,
)
from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.stack import Stack, run_blocks, stack_blocks


class PerceiverAR(eqx.Module):
    """Perceiver AR (Hawthorne et al. 2022): a long causal context read into a few latents.

    The `seq <= block_size` tokens are embedded with learned positions; the last
    `min(n_latents, seq)` positions become the latents, which one causal cross-attention layer
    (`z = z + xattn(z, x)`, then `z = z + mlp(norm(z))`) lets see every context position up to
    their own. A stack of causal self-attention blocks then runs over the latents alone, so its
    cost does not grow with the context. Logits come only for the latents' positions: the model
    predicts the tokens after the last `n_latents` positions of its input. A `LanguageModel`
    but no `CachedDecoder` (`gptzoo.models.protocol`): see the Generation page for why its
    latents cannot be cached exactly; the sampler recomputes its context.
    """

    token_embedding: Embedding
    position_embedding: PositionalEmbedding
    embed_dropout: eqx.nn.Dropout
    cross_attention: CausalCrossAttention
    cross_mlp_norm: eqx.Module
    cross_mlp: eqx.Module
    blocks: Stack | tuple[eqx.Module, ...]
    final_norm: eqx.Module
    head: Linear | None
    block_size: int = eqx.field(static=True)
    n_latents: int = eqx.field(static=True)

    def __check_init__(self):
        if not 1 <= self.n_latents <= self.block_size:
            raise ValueError(f"n_latents={self.n_latents} must lie in [1, block_size="
                             f"{self.block_size}]: the latents are the context's last positions")

    @property
    def context_window(self) -> int:
        """Every latent reads the whole context through the cross-attention."""
        return self.block_size

    def n_predicted(self, seq: int) -> int:
        """The latents: the last `min(n_latents, seq)` positions."""
        return min(self.n_latents, seq)

    @typecheck
    def __call__(
        self, tokens: Int[Array, "*batch seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch latents vocab"]:
        """Next-token logits at the last `min(n_latents, seq)` positions; dropout with `key`."""
        keys = jax.random.split(key, 4) if key is not None else [None] * 4
        embed_key, cross_key, mlp_key, blocks_key = keys
        seq = tokens.shape[-1]
        x = self.token_embedding(tokens) + self.position_embedding(jnp.arange(seq))
        x = self.embed_dropout(x, key=embed_key, inference=key is None)
        z = x[..., seq - self.n_predicted(seq):, :]
        z = z + self.cross_attention(z, x, key=cross_key)
        z = z + self.cross_mlp(self.cross_mlp_norm(z), key=mlp_key)
        z = run_blocks(self.blocks, z, key=blocks_key)
        z = self.final_norm(z)
        return head_logits(self.token_embedding, self.head, z)


@dataclasses.dataclass
class PerceiverARConfig(ArchitectureConfig):
    """Perceiver AR's config: `ModelConfig`'s sizes (`n_layers` latent blocks), and

    - `n_latents`: the context's last positions that become latents and are predicted.
    """

    n_latents: int = 128


def perceiver_ar(vocab_size: int, *, key: PRNGKeyArray, **fields) -> PerceiverAR:
    """Perceiver AR of `vocab_size` tokens; `fields` are `PerceiverARConfig`'s.

    GPT-2 parts: LayerNorm, GELU MLPs, `n_layers` pre-norm latent blocks. GPT-2's init: N(0,
    0.02), and residual-stream outputs N(0, 0.02 / sqrt(2 (n_layers + 1))), the cross-attention
    layer counted as one more layer. `scan_layers`: the latent blocks as a `Stack` run with
    `jax.lax.scan` (see `decoder`).
    """
    return build(PerceiverARConfig(**fields).resolved(), vocab_size, key=key)


def build(c: PerceiverARConfig, vocab_size: int, *, key: PRNGKeyArray) -> PerceiverAR:
    """Perceiver AR from its resolved config (`Family.build`)."""
    n_layers, d_model, n_heads = c.n_layers, c.d_model, c.n_heads
    dropout, use_bias = c.dropout, c.use_bias
    tok_key, pos_key, head_key, cross_key, mlp_key, *block_keys = jax.random.split(
        key, n_layers + 5)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * (n_layers + 1))

    def mlp(k: PRNGKeyArray) -> MLP:
        return MLP(d_model, dropout=dropout, use_bias=use_bias, init_std=std,
                   out_init_std=out_std, key=k)

    def block(k: PRNGKeyArray) -> Block:
        attn_key, block_mlp_key = jax.random.split(k)
        return Block(
            attn_norm=LayerNorm(d_model, use_bias=use_bias),
            attention=CausalSelfAttention(d_model, n_heads, dropout=dropout, use_bias=use_bias,
                                          init_std=std, out_init_std=out_std, key=attn_key),
            mlp_norm=LayerNorm(d_model, use_bias=use_bias),
            mlp=mlp(block_mlp_key),
        )

    return PerceiverAR(
        token_embedding=Embedding(vocab_size, d_model, init_std=std, key=tok_key),
        position_embedding=PositionalEmbedding(c.block_size, d_model, init_std=std, key=pos_key),
        embed_dropout=eqx.nn.Dropout(dropout),
        cross_attention=CausalCrossAttention(d_model, n_heads, dropout=dropout, use_bias=use_bias,
                                             init_std=std, out_init_std=out_std, key=cross_key),
        cross_mlp_norm=LayerNorm(d_model, use_bias=use_bias),
        cross_mlp=mlp(mlp_key),
        blocks=stack_blocks([block(k) for k in block_keys], c.scan_layers),
        final_norm=LayerNorm(d_model, use_bias=use_bias),
        head=None if c.tie_head else Linear(d_model, vocab_size, use_bias=False, init_std=std,
                                            key=head_key),
        block_size=c.block_size,
        n_latents=c.n_latents,
    )


FAMILY = register(Family(name="perceiver_ar", config=PerceiverARConfig, build=build))
