from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn import Embedding, Linear, PositionalEmbedding
from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.decoding import decodes_from_cache
from gptzoo.nn.moe import load_balancing_loss
from gptzoo.nn.stack import (
    Stack,
    block_kinds,
    decode_blocks,
    init_caches,
    run_blocks,
    split_aux,
    stack_blocks,
)


class GPT(eqx.Module):
    """A decoder-only language model: embeddings, a stack of blocks, a final norm and a head.

    It composes whatever parts it is given; `decoder(...)` assembles one, and the families
    (`gpt2`, `llama`) build their layouts with it. A `CachedDecoder` (`gptzoo.models.protocol`):
    it decodes from a KV cache when its parts allow (`cacheable`).

    **Arguments:**

    - `token_embedding`: the token table (`nn.Embedding`).
    - `position_embedding`: learned positions, or None when attention carries them (rotary,
        ALiBi).
    - `blocks`: a tuple of blocks, or a `Stack` of identical ones run with `jax.lax.scan`.
    - `final_norm`: the norm before the head.
    - `head`: the output head, or None to tie it to the token embedding.
    - `embed_dropout`: dropout on the embeddings.
    - `block_size`: the longest context.
    - `head_qk`: when given (e.g. `nn.HeadQK`), maps the final-norm output and the tokens to
        extra logits added to the head's.
    - `window`: the sliding window its attention was built with (None: none), which
        `context_window` reports.
    """

    token_embedding: Embedding
    position_embedding: PositionalEmbedding | None
    blocks: Stack | tuple[eqx.Module, ...]
    final_norm: eqx.Module
    head: Linear | None
    embed_dropout: eqx.nn.Dropout
    block_size: int = eqx.field(static=True)
    head_qk: eqx.Module | None = None
    window: int | None = eqx.field(static=True, default=None)

    @typecheck
    def __call__(
        self, tokens: Int[Array, "*batch seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq vocab"]:
        """Next-token logits at every position of one sequence or a batch of them.

        Dropout is active only when `key` is given.
        """
        return self._forward(tokens, key)[0]

    def _forward(self, tokens, key):
        """The logits, and what the blocks return beside the residual stream summed over them (a
        mixture of experts' `RouterStats`), None for blocks that return it alone."""
        x, aux = self._hidden_and_aux(tokens, key)
        return self._logits(x, tokens), aux

    def _hidden_and_aux(self, tokens, key):
        embed_key, blocks_key = jax.random.split(key) if key is not None else (None, None)
        x = self._embed(tokens, jnp.arange(tokens.shape[-1]))
        x = self.embed_dropout(x, key=embed_key, inference=key is None)
        x, aux = split_aux(run_blocks(self.blocks, x, key=blocks_key))
        return self.final_norm(x), aux

    @typecheck
    def hidden_states(
        self, tokens: Int[Array, "*batch seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq d_model"]:
        """The final norm's output: the head's input."""
        return self._hidden_and_aux(tokens, key)[0]

    def head_weight(self) -> Float[Array, "vocab d_model"]:
        """The head's `(vocab, d_model)` matrix: the token embedding's when tied."""
        if self.head_qk is not None:
            raise ValueError("head-QK adds logits that are no linear map of the hidden states")
        if self.head is None:
            return self.token_embedding.weight
        if not isinstance(self.head, Linear) or self.head.bias is not None:
            raise ValueError(f"the head ({type(self.head).__name__}) is not one bias-free "
                             "matrix")
        return self.head.weight.T

    @property
    def context_window(self) -> int:
        """How far back a position's attention reads: `block_size`, or a narrower `window`."""
        return self.block_size if self.window is None else min(self.window, self.block_size)

    def n_predicted(self, seq: int) -> int:
        """Every position is predicted."""
        return seq

    @property
    def cacheable(self) -> bool:
        """Whether `decode` applies: every block is an `nn.CachedBlock` and no part mixes
        positions outside attention (`nn.MixesPositions`), which a per-token step could not."""
        return decodes_from_cache(block_kinds(self.blocks), self.head_qk)

    @property
    def slides_window(self) -> bool:
        """Without learned positions the cache slides past block_size; with them, the sampler
        crops the context and recomputes, as nanoGPT does."""
        return self.position_embedding is None

    def init_cache(self):
        """Each block's KV cache: a tuple of them, or one with a layer axis for a `Stack`."""
        return init_caches(self.blocks, lambda b: b.init_cache(self.block_size))

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


class MoEGPT(GPT):
    """A `GPT` whose blocks route tokens to experts (`nn.MoEBlock`s, which return their
    `RouterStats`), and an `AuxLossModel`: training adds `aux_loss_coef` times the
    load-balancing loss of every layer's routing (`nn.load_balancing_loss`) to the cross-entropy,
    as Mixtral's `router_aux_loss_coef` does. Its call gives the logits alone, as a `GPT`'s.

    **Arguments:**

    - `GPT`'s arguments, and
    - `aux_loss_coef`: the load-balancing loss's weight in the training loss (keyword only).
    """

    aux_loss_coef: float = eqx.field(static=True, kw_only=True)

    @typecheck
    def logits_and_aux(
        self, tokens: Int[Array, "*batch seq"], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "*batch seq vocab"], Float[Array, ""]]:
        """The logits and the load-balancing loss (unweighted) of the batch's tokens, pooled over
        every layer's router as transformers' `load_balancing_loss_func` pools them."""
        logits, stats = self._forward(tokens, key)
        if stats is None:
            raise ValueError("MoEGPT's blocks return no router statistics; build its blocks "
                             "from nn.MoEBlock, or use a GPT")
        return logits, load_balancing_loss(stats)


def head_logits(embedding: Embedding, head: Linear | None,
                x: Float[Array, "*batch seq d_model"]) -> Float[Array, "*batch seq vocab"]:
    """The output head (tied to `embedding` when `head` is None) in float32 whatever `x`'s dtype,
    as the softmax and loss over the vocabulary need."""
    return embedding.unembed(x) if head is None else head(x, out_dtype=jnp.float32)


def decoder(
    vocab_size: int, *, block: Callable[[PRNGKeyArray], eqx.Module], n_layers: int, d_model: int,
    block_size: int, final_norm: eqx.Module, positions: str | None = "learned",
    tie_head: bool = True, dropout: float = 0.0, init_std: float = 0.02,
    head_qk: eqx.Module | None = None, scan_layers: bool = True, window: int | None = None,
    aux_loss_coef: float | None = None, key: PRNGKeyArray,
) -> GPT:
    """A GPT around `n_layers` blocks made by `block(key)`: how recipes assemble zoo models.

    Token embedding, learned positions (`positions="learned"`; None when the blocks' attention
    carries positions itself, e.g. `Rotary` or `ALiBi`), the blocks, `final_norm` and an output
    head tied to the token embedding (`tie_head`) or its own. Embeddings and an untied head start
    at N(0, init_std); `head_qk` is passed on to `GPT`. With `scan_layers`, blocks identical in
    structure are stacked into a `Stack` and run with `jax.lax.scan` (one block to compile
    whatever the depth); otherwise, or when they differ, they stay a tuple. `window`: the
    sliding window the blocks' attention was given, if any (`GPT.context_window`).
    `aux_loss_coef`: None for a `GPT`; for blocks that route to experts, a `MoEGPT` whose
    training loss adds that times their load-balancing loss.
    """
    if positions not in ("learned", None):
        raise ValueError(f"positions={positions!r} is not a position scheme decoder knows; pass "
                         "'learned' for a learned embedding or None when attention adds positions")
    # Split as gpt2 does, so a gpt2 block factory rebuilds gpt2's model exactly.
    tok_key, pos_key, head_key, *block_keys = jax.random.split(key, n_layers + 3)
    moe = {} if aux_loss_coef is None else {"aux_loss_coef": aux_loss_coef}
    return (GPT if aux_loss_coef is None else MoEGPT)(
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
        window=window,
        **moe,
    )
