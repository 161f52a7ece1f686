import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn import (
    MLP,
    Block,
    CausalSelfAttention,
    Embedding,
    LayerNorm,
    Linear,
    PositionalEmbedding,
)
from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.stack import (
    Stack,
    block_kinds,
    decode_blocks,
    init_caches,
    run_blocks,
    stack_blocks,
)


class GPT(eqx.Module):
    """A decoder-only language model: embeddings, a stack of blocks, a final norm and a head.

    It composes whatever parts it is given; `gpt2(...)` below builds the classic layout.
    `blocks` is a tuple of blocks, or a `Stack` of identical ones run with `jax.lax.scan`.
    `head=None` ties the output head to the token embedding. `head_qk` (e.g. `nn.HeadQK`), when
    given, maps the final-norm output and the tokens to extra logits added to the head's.
    """

    token_embedding: Embedding
    position_embedding: PositionalEmbedding | None
    blocks: Stack | tuple[eqx.Module, ...]
    final_norm: eqx.Module
    head: Linear | None
    embed_dropout: eqx.nn.Dropout
    block_size: int = eqx.field(static=True)
    head_qk: eqx.Module | None = None

    @typecheck
    def __call__(
        self, tokens: Int[Array, "*batch seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq vocab"]:
        """Next-token logits at every position of one sequence or a batch of them.

        Dropout is active only when `key` is given.
        """
        embed_key, blocks_key = jax.random.split(key) if key is not None else (None, None)
        x = self._embed(tokens, jnp.arange(tokens.shape[-1]))
        x = self.embed_dropout(x, key=embed_key, inference=key is None)
        x = run_blocks(self.blocks, x, key=blocks_key)
        return self._logits(self.final_norm(x), tokens)

    # The KV-cache protocol of gptzoo.sample: per example, positions below block_size.
    @property
    def cacheable(self) -> bool:
        """Whether `decode` applies: every block has one, and no part mixes positions outside
        attention (a spatial gating unit, head-QK), which a per-token step could not."""
        parts = jax.tree.leaves(self, is_leaf=_mixes_positions)
        return (not any(_mixes_positions(p) for p in parts)
                and all(hasattr(b, "decode") for b in block_kinds(self.blocks)))

    @property
    def slides_window(self) -> bool:
        """Without learned positions the cache slides past block_size; with them, the sampler
        crops the context and recomputes, as nanoGPT does."""
        return self.position_embedding is None

    def init_cache(self):
        """Each block's KV cache: a tuple of them, or one with a layer axis for a `Stack`."""
        return init_caches(self.blocks, lambda b: b.attention.init_cache(self.block_size))

    @typecheck
    def decode(
        self, tokens: Int[Array, " seq"], positions: Int[Array, " seq"], cache
    ) -> tuple[Float[Array, "seq vocab"], object]:
        """Logits for one example's new tokens at `positions`, and the cache extended by them."""
        x, cache = decode_blocks(self.blocks, self._embed(tokens, positions), positions, cache)
        return self._logits(self.final_norm(x), tokens), cache

    def _embed(self, tokens, positions):
        x = self.token_embedding(tokens)
        return x if self.position_embedding is None else x + self.position_embedding(positions)

    def _logits(self, x, tokens):
        logits = head_logits(self.token_embedding, self.head, x)
        return logits if self.head_qk is None else logits + self.head_qk(x, tokens)


def head_logits(embedding: Embedding, head: Linear | None,
                x: Float[Array, "*batch seq d_model"]) -> Float[Array, "*batch seq vocab"]:
    """The output head (tied to `embedding` when `head` is None) in float32 whatever `x`'s dtype,
    as the softmax and loss over the vocabulary need."""
    return embedding.unembed(x) if head is None else head(x, out_dtype=jnp.float32)


def _mixes_positions(part) -> bool:
    return getattr(part, "mixes_positions", False)

def decoder(
    vocab_size: int, *, block: Callable[[PRNGKeyArray], eqx.Module], n_layers: int, d_model: int,
    block_size: int, final_norm: eqx.Module, positions: str | None = "learned",
    tie_head: bool = True, dropout: float = 0.0, init_std: float = 0.02,
    head_qk: eqx.Module | None = None, scan_layers: bool = True, key: PRNGKeyArray,
) -> GPT:
    """A GPT around `n_layers` blocks made by `block(key)`: how recipes assemble zoo models.

    Token embedding, learned positions (`positions="learned"`; None when the blocks' attention
    carries positions itself, e.g. `Rotary` or `ALiBi`), the blocks, `final_norm` and an output
    head tied to the token embedding (`tie_head`) or its own. Embeddings and an untied head start
    at N(0, init_std); `head_qk` is passed on to `GPT`. With `scan_layers`, blocks identical in
    structure are stacked into a `Stack` and run with `jax.lax.scan` (one block to compile
    whatever the depth); otherwise, or when they differ, they stay a tuple.
    """
    if positions not in ("learned", None):
        raise ValueError(f"positions={positions!r} is not a position scheme decoder knows; pass "
                         "'learned' for a learned embedding or None when attention adds positions")
    # Split as gpt2 does, so a gpt2 block factory rebuilds gpt2's model exactly.
    tok_key, pos_key, head_key, *block_keys = jax.random.split(key, n_layers + 3)
    return GPT(
        token_embedding=Embedding(vocab_size, d_model, init_std=init_std, key=tok_key),
        position_embedding=(PositionalEmbedding(block_size, d_model, init_std=init_std,
                                                key=pos_key) if positions == "learned" else None),
        blocks=stack_blocks([block(k) for k in block_keys], scan_layers),
        final_norm=final_norm,
        head=None if tie_head else Linear(d_model, vocab_size, use_bias=False,
                                          init_std=init_std, key=head_key),
        embed_dropout=eqx.nn.Dropout(dropout),
        block_size=block_size,
        head_qk=head_qk,
    )


def gpt2(
    vocab_size: int, *, n_layers: int, n_heads: int, d_model: int, block_size: int,
    dropout: float = 0.0, use_bias: bool = True, tie_head: bool = True, init: str = "gpt2",
    norm_eps: float = 1e-5, approximate_gelu: bool = True, scan_layers: bool = True,
    key: PRNGKeyArray,
) -> GPT:
    """GPT-2: learned positions, LayerNorm (epsilon `norm_eps`), GELU MLP (tanh approximation
    unless `approximate_gelu=False`), pre-norm blocks.

    `init="gpt2"`: weights and embeddings N(0, 0.02), residual-stream outputs (attention and MLP
    output projections) N(0, 0.02 / sqrt(2 * n_layers)).
    `init="small"`: every weight matrix, residual outputs and an untied head included,
    N(0, sqrt(2 / (5 d_model))) (small init, Nguyen & Salazar 2019), and token and position
    embeddings uniform(-1e-4, 1e-4) (BlinkDL's small embedding init). Biases start at zero and norms
    at one either way. `scan_layers`: see `decoder`.
    """
    if init == "gpt2":
        # GPT-2 scales the init of each residual-stream output by 1/sqrt(2 * n_layers).
        std, out_std = 0.02, 0.02 / math.sqrt(2 * n_layers)
    elif init == "small":
        std = out_std = math.sqrt(2 / (5 * d_model))
    else:
        raise ValueError(f"init={init!r} is not an initialisation gpt2 knows; "
                         "choose 'gpt2' or 'small'")

    def block(k: PRNGKeyArray) -> Block:
        attn_key, mlp_key = jax.random.split(k)
        return Block(
            attn_norm=LayerNorm(d_model, use_bias=use_bias, eps=norm_eps),
            attention=CausalSelfAttention(
                d_model, n_heads, dropout=dropout, use_bias=use_bias, init_std=std,
                out_init_std=out_std, key=attn_key,
            ),
            mlp_norm=LayerNorm(d_model, use_bias=use_bias, eps=norm_eps),
            mlp=MLP(d_model, dropout=dropout, use_bias=use_bias, approximate_gelu=approximate_gelu,
                    init_std=std, out_init_std=out_std, key=mlp_key),
        )

    model = decoder(vocab_size, block=block, n_layers=n_layers, d_model=d_model,
                    block_size=block_size,
                    final_norm=LayerNorm(d_model, use_bias=use_bias, eps=norm_eps),
                    tie_head=tie_head, dropout=dropout, init_std=std, scan_layers=scan_layers,
                    key=key)
    if init == "small":  # BlinkDL's small embeddings, drawn from the keys decoder used
        tok_key, pos_key = jax.random.split(key, n_layers + 3)[:2]
        model = eqx.tree_at(lambda m: (m.token_embedding.weight, m.position_embedding.weight),
                            model, (_small_table(tok_key, model.token_embedding.weight.shape),
                                    _small_table(pos_key, model.position_embedding.weight.shape)))
    return model


def _small_table(key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
    return jax.random.uniform(key, shape, minval=-1e-4, maxval=1e-4)
