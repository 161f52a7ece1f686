"""Gradient accumulation: one optimizer step's global batch as `steps` micro-batches in a
`lax.scan`, so the activations of only one micro-batch are alive at a time.

Micro-batch `j` takes the rows `j, j + steps, j + 2 * steps, ...` of the global batch: reshaping
`(batch, ...)` to `(batch / steps, steps, ...)` keeps the leading axis sharded as the batch was, so
every data shard keeps `1 / shards` of every micro-batch and no row moves between devices. This
needs `batch / steps` to divide over the shards (`gptzoo.data.batch_schedule.checked_schedule`).
"""


import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray


def accumulated_grad(loss_sum, params, batch: Int[Array, "batch ..."], steps: int,
                     key: PRNGKeyArray, sharding: NamedSharding
                     ) -> tuple[Float[Array, ""], object, Float[Array, ""]]:
    """`(loss, grads, extra)` of the mean token loss over `batch`: `loss_sum(params, micro_batch,
    key)` returns `(sum of the token losses, (number of tokens, extra sum))` of a micro-batch,
    the extra sum another quantity weighted by the tokens (an auxiliary loss) that is reported
    beside the loss. Sums and gradients accumulate in float32 over the micro-batches and are
    divided by the total token count at the end, so the result equals one pass over the whole
    batch. `sharding` is the batch's; micro-batch `j`'s dropout key is `fold_in(key, j)`."""
    value_and_grad = eqx.filter_value_and_grad(loss_sum, has_aux=True)
    if steps == 1:  # no loop, no zero-filled accumulators: the common case stays a plain step
        (total, (count, extra)), grads = value_and_grad(params, batch, jax.random.fold_in(key, 0))
        count = jnp.float32(count)
        return total.astype(jnp.float32) / count, jax.tree.map(
            lambda g: g.astype(jnp.float32) / count, grads), extra.astype(jnp.float32) / count
    micro = jnp.swapaxes(batch.reshape(batch.shape[0] // steps, steps, *batch.shape[1:]), 0, 1)
    micro = jax.lax.with_sharding_constraint(
        micro, NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec)))

    def one(carry, xs):
        total, count, extra, grads = carry
        j, rows = xs
        (loss, (n, more)), g = value_and_grad(params, rows, jax.random.fold_in(key, j))
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        return (total + loss.astype(jnp.float32), count + jnp.int32(n),
                extra + more.astype(jnp.float32), grads), None

    floating = eqx.filter(params, eqx.is_inexact_array)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), floating)
    start = (jnp.float32(0), jnp.int32(0), jnp.float32(0), zeros)
    (total, count, extra, grads), _ = jax.lax.scan(one, start, (jnp.arange(steps), micro))
    count = count.astype(jnp.float32)
    return total / count, jax.tree.map(lambda g: g / count, grads), extra / count
