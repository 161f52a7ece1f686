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

import functools

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


@typecheck
def head_cross_entropy(hidden: Float[Array, "batch seq d_model"],
                       weight: Float[Array, "vocab d_model"], labels: Int[Array, "batch seq"],
                       chunk: int) -> Float[Array, "batch seq"]:
    """`cross_entropy(hidden @ weight.T, labels)` computed `chunk` positions of every sequence at
    a time, forward and backward, so that only one chunk's float32 logits (batch x chunk x vocab)
    exist at once instead of the whole batch's; the backward recomputes each chunk's logits.
    Chunks run along the sequence, so a batch split over devices stays split."""
    seq = hidden.shape[1]
    chunk = min(chunk, seq)  # a chunk past the sequence would only add padding
    pad = -seq % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
    return _head_cross_entropy(hidden, weight, labels, chunk)[:, :seq]


def _chunked(a, chunk):
    """`(batch, seq, ...)` as `(seq / chunk, batch, chunk, ...)`."""
    return jnp.moveaxis(a.reshape(a.shape[0], -1, chunk, *a.shape[2:]), 1, 0)


def _unchunked(a):
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], -1, *a.shape[3:])


def _chunk_logits(hidden, weight):
    """One chunk's float32 logits as rows: `(batch * chunk, vocab)`."""
    return jnp.matmul(hidden.reshape(-1, hidden.shape[-1]), weight.T,
                      preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_cross_entropy(hidden, weight, labels, chunk):
    return _head_forward(hidden, weight, labels, chunk)[0]


def _head_forward(hidden, weight, labels, chunk):
    def one(args):
        h, y = args
        logits = _chunk_logits(h, weight)
        normaliser = jax.nn.logsumexp(logits, axis=-1)
        label_logits = jnp.take_along_axis(logits, y.reshape(-1, 1), axis=-1)[:, 0]
        return (normaliser - label_logits).reshape(y.shape), normaliser.reshape(y.shape)

    losses, normalisers = jax.lax.map(one, (_chunked(hidden, chunk), _chunked(labels, chunk)))
    return _unchunked(losses), (hidden, weight, labels, _unchunked(normalisers))


def _head_backward(chunk, saved, cotangent):
    hidden, weight, labels, normalisers = saved

    def one(weight_grad, args):
        h, y, normaliser, ct = args
        logits = _chunk_logits(h, weight)
        is_label = y.reshape(-1, 1) == jnp.arange(logits.shape[-1])
        # softmax - one_hot, scaled by the cotangent; multiplied in the inputs' dtype as
        # `nn.linear.matmul`'s backward does.
        logits_grad = ((jnp.exp(logits - normaliser.reshape(-1, 1)) - is_label)
                       * ct.reshape(-1, 1)).astype(h.dtype)
        hidden_grad = jnp.matmul(logits_grad, weight, preferred_element_type=jnp.float32)
        weight_grad += jnp.matmul(logits_grad.T, h.reshape(-1, h.shape[-1]),
                                  preferred_element_type=jnp.float32)
        return weight_grad, hidden_grad.astype(h.dtype).reshape(h.shape)

    chunks = tuple(_chunked(a, chunk) for a in (hidden, labels, normalisers, cotangent))
    weight_grad, hidden_grads = jax.lax.scan(one, jnp.zeros(weight.shape, jnp.float32), chunks)
    return _unchunked(hidden_grads), weight_grad.astype(weight.dtype), None


_head_cross_entropy.defvjp(_head_forward, _head_backward)
