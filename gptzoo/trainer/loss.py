"""Next-token cross-entropy, written for the memory traffic of a large vocabulary.

GPT-2 small's logits for one micro-batch of 64 sequences are 64 x 1,024 x 50,304 float32 values
(13 GB), so every pass over them counts. Autodiff of
`optax.softmax_cross_entropy_with_integer_labels` transposes its gather of the labels' logits
into a scatter-add into a zeroed array of the logits' size, which the backward then adds to the
softmax's gradient. `cross_entropy`'s backward is written by hand: `softmax - one_hot` in one
elementwise pass, in which XLA also fuses the cast to the compute dtype of the head's backward,
so the logits are read three times in all: the forward's two reductions and that backward
(docs/benchmarks.md, "On one H100").
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from gptzoo.nn._typecheck import typecheck


@typecheck
def cross_entropy(logits: Float[Array, "*rows vocab"], labels: Int[Array, "*rows"]
                  ) -> Float[Array, "*rows"]:
    """`-log softmax(logits)[label]` per row, in float32 whatever the logits' dtype."""
    return _cross_entropy(logits, labels)


@jax.custom_vjp
def _cross_entropy(logits, labels):
    return _forward(logits, labels)[0]


def _forward(logits, labels):
    wide = logits.astype(jnp.float32)
    normaliser = jax.nn.logsumexp(wide, axis=-1)
    label_logits = jnp.take_along_axis(wide, labels[..., None], axis=-1)[..., 0]
    return normaliser - label_logits, (logits, labels, normaliser)


def _backward(saved, cotangent):
    logits, labels, normaliser = saved
    probabilities = jnp.exp(logits.astype(jnp.float32) - normaliser[..., None])
    is_label = labels[..., None] == jnp.arange(logits.shape[-1])
    # One elementwise pass (XLA fuses the one-hot compare and the cast); the labels are integers.
    return ((probabilities - is_label) * cotangent[..., None]).astype(logits.dtype), None


_cross_entropy.defvjp(_forward, _backward)
