from collections.abc import Callable

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from gptzoo.models.gpt import GPT
from gptzoo.nn import Embedding, Linear, PositionalEmbedding


def decoder(
    vocab_size: int, *, block: Callable[[PRNGKeyArray], eqx.Module], n_layers: int, d_model: int,
    block_size: int, final_norm: eqx.Module, positions: str | None = "learned",
    tie_head: bool = True, dropout: float = 0.0, init_std: float = 0.02,
    head_qk: eqx.Module | None = None, key: PRNGKeyArray,
) -> GPT:
    """A GPT around `n_layers` blocks made by `block(key)`: how recipes assemble zoo models.

    Token embedding, learned positions (`positions="learned"`; None when the blocks' attention
    carries positions itself, e.g. `Rotary` or `ALiBi`), the blocks, `final_norm` and an output
    head tied to the token embedding (`tie_head`) or its own. Embeddings and an untied head start
    at N(0, init_std); `head_qk` is passed on to `GPT`.
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
        blocks=tuple(block(k) for k in block_keys),
        final_norm=final_norm,
        head=None if tie_head else Linear(d_model, vocab_size, use_bias=False,
                                          init_std=init_std, key=head_key),
        embed_dropout=eqx.nn.Dropout(dropout),
        block_size=block_size,
        head_qk=head_qk,
    )
