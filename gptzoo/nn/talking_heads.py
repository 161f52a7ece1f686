import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from gptzoo.nn.attention import causal_mask
from gptzoo.nn.attention_inputs import (
    AttentionVariant,
    CacheRead,
    check_unwindowed,
    shared_heads,
)
from gptzoo.nn.self_attention import CausalSelfAttention


class TalkingHeadsAttention(AttentionVariant):
    """Talking-heads attention (Shazeer et al. 2020): causal self-attention whose heads exchange
    information through two learned `(heads, heads)` maps, one over the scaled scores before the
    softmax (`pre_softmax`) and one over the weights after it (`post_softmax`):
    `s'[g] = sum_h pre_softmax[g, h] s[h]`, `w'[g] = sum_h post_softmax[g, h] w[h]`.

    Both start at the identity, so the module starts as the plain multi-head `attention` it wraps
    (projections, heads, position hook and dropout are that module's). A position bias (ALiBi)
    is added after the pre-softmax mix, keeping each head's own slope, and attention dropout acts
    on the mixed weights. Mixing needs every head's whole row of scores at once, so this
    computes the full `(heads, seq, seq)` scores with einsums on every backend: no block-causal
    skipping of the masked half and no cuDNN kernel. Masked keys have weight 0 in every head,
    so the post-softmax mix keeps the attention causal.

    **Arguments:**

    - `attention`: the `CausalSelfAttention` whose heads talk.
    """

    pre_softmax: Float[Array, "heads heads"]
    post_softmax: Float[Array, "heads heads"]

    def __init__(self, attention: CausalSelfAttention):
        self.attention = attention
        self.pre_softmax = jnp.eye(attention.n_heads)
        self.post_softmax = jnp.eye(attention.n_heads)

    def __check_init__(self):
        check_unwindowed("TalkingHeadsAttention", self.attention)

    def _attend_sequence(self, q, k, v, bias, key):
        seq = q.shape[-3]
        return self._attend(q, k, v, causal_mask(seq, seq), bias, key)

    def _attend_cache(self, read: CacheRead):
        return self._attend(read.q, read.keys, read.values, read.visible, read.bias, None)

    def _attend(
        self, q: Float[Array, "*batch q heads head_dim"],
        k: Float[Array, "*batch k kv_heads head_dim"],
        v: Float[Array, "*batch k kv_heads head_dim"],
        visible: Bool[Array, "q k"], bias: Float[Array, "heads q k"] | None,
        key: PRNGKeyArray | None,
    ) -> Float[Array, "*batch q heads head_dim"]:
        """Talking-heads attention of `q` over the keys each query sees, in float32 whatever the
        inputs' dtype (as `attention_weights`), returned in v's dtype."""
        n_heads, dtype = q.shape[-2], v.dtype
        q, k, v = (a.astype(jnp.float32) for a in (q, shared_heads(k, n_heads),
                                                   shared_heads(v, n_heads)))
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
        scores = jnp.einsum("gh,...hqk->...gqk", self.pre_softmax.astype(jnp.float32), scores)
        if bias is not None:
            scores = scores + bias
        weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
        weights = jnp.einsum("gh,...hqk->...gqk", self.post_softmax.astype(jnp.float32), weights)
        weights = self.attention.attn_dropout(weights, key=key, inference=key is None)
        return jnp.einsum("...hqk,...khd->...qhd", weights, v).astype(dtype)
