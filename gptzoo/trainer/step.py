"""The jitted train and eval functions. They know nothing of any particular model: a model is a
`LanguageModel` (`gptzoo.models.protocol`), mapping `tokens (batch, seq)` to the logits of its last
`n_predicted(seq)` positions, `(batch, n, vocab)`, with dropout keyed by an optional `key`."""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from gptzoo.models.protocol import AuxLossModel, LanguageModel
from gptzoo.nn.activation_sharding import activation_sharding
from gptzoo.trainer.accumulate import accumulated_grad
from gptzoo.trainer.loss import cross_entropy, head_cross_entropy
from gptzoo.trainer.precision import in_compute_dtype
from gptzoo.trainer.sharding import activation_rule, batch_sharded, shard


def loss_fn(model: LanguageModel, inputs: Int[Array, "batch seq"], targets: Int[Array, "batch seq"],
            key: PRNGKeyArray | None = None) -> Float[Array, ""]:
    return token_losses(model, inputs, targets, key).mean()


def token_losses(model: LanguageModel, inputs: Int[Array, "batch seq"],
                 targets: Int[Array, "batch seq"], key: PRNGKeyArray | None = None,
                 head_chunk: int = 0) -> Float[Array, "batch predicted"]:
    """The float32 cross-entropy of every predicted position, whatever the compute dtype; with
    `head_chunk`, the head and the loss run that many positions at a time (the model a
    `LinearHeadModel`)."""
    if head_chunk:
        hidden = model.hidden_states(inputs, key=key)
        return head_cross_entropy(hidden, model.head_weight(), predicted(targets, hidden),
                                  head_chunk)
    logits = model(inputs, key=key)
    return cross_entropy(logits, predicted(targets, logits))


def batch_loss_sum(model: LanguageModel, batch: Int[Array, "batch block_plus_1"],
                   key: PRNGKeyArray | None, head_chunk: int = 0
                   ) -> tuple[Float[Array, ""], tuple[int, Float[Array, ""]]]:
    """`(sum of the token losses, (number of predicted tokens, aux loss times that number))` of
    one batch of windows. For an `AuxLossModel` each token's loss adds `aux_loss_coef` times the
    batch's auxiliary loss, so that their mean is the cross-entropy plus the weighted auxiliary
    loss; for any other model the auxiliary loss is 0. `head_chunk`: as `token_losses`'s."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    if not isinstance(model, AuxLossModel):
        losses = token_losses(model, inputs, targets, key, head_chunk)
        return losses.sum(), (losses.size, jnp.float32(0))
    logits, aux = model.logits_and_aux(inputs, key=key)
    losses = cross_entropy(logits, predicted(targets, logits))
    return losses.sum() + model.aux_loss_coef * aux * losses.size, (losses.size, aux * losses.size)


def predicted(a: Array, logits: Array) -> Array:
    """The last `logits.shape[-2]` positions of `a` (all of them unless the model predicts only
    its input's last positions, as Perceiver AR's latents do)."""
    return a[..., a.shape[-1] - logits.shape[-2]:]


class StepStats(NamedTuple):
    """Per optimizer step of a chunk: the loss, the global gradient norm before clipping,
    whether both were finite (a step where they were not was skipped), and the auxiliary loss
    of an `AuxLossModel` (unweighted; 0 for other models)."""

    loss: Float[Array, " n"]
    grad_norm: Float[Array, " n"]
    finite: Bool[Array, " n"]
    aux_loss: Float[Array, " n"]


def guarded_update(optimizer: optax.GradientTransformation, loss, grads, params, opt_state):
    """`(params, opt_state, grad_norm, finite)` after one optimizer update, or with params and
    state unchanged when the loss or a gradient is not finite: one overflowing batch is skipped
    rather than written into every weight. Selecting with `where` keeps it deterministic, so a
    resumed run still repeats an uninterrupted one bit for bit."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_state = optimizer.update(grads, opt_state, params)
    new_params = eqx.apply_updates(params, updates)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    params, opt_state = keep_if_finite(new_params, params), keep_if_finite(new_state, opt_state)
    return params, opt_state, grad_norm, finite


def trainable_arrays(model):
    """`make_train_chunk`'s default `partition`: every array trains."""
    return eqx.partition(model, eqx.is_array)


def make_train_chunk(optimizer: optax.GradientTransformation, mesh: Mesh, *,
                     precision: str = "float32", grad_accum_steps: int = 1,
                     partition: Callable = trainable_arrays, head_chunk: int = 0):
    """`train_chunk((batches, key, start), model, opt_state)` runs one optimizer step per batch of
    `batches (n_steps, batch, block + 1)` (a `Batches.chunk`) in one compiled `lax.scan` and
    returns the updated model and state and each step's `StepStats`. Each step computes in
    `precision` (`trainer.precision`) over `grad_accum_steps` micro-batches of its batch.
    `partition(model)` gives `(trainable, frozen)` parts (e.g. LoRA's adapters and the rest): only
    the first gets gradients and optimizer updates, the second is read as it is. `head_chunk`
    (`trainer.head_chunk`): the loss's head runs that many positions at a time (0: all at once).

    The dropout randomness of step `s` comes from `fold_in(key, s)` and its batch from the
    loader's (seed, step), so a run resumes exactly from any step. Model and state are donated.
    """

    @eqx.filter_jit(donate="all-except-first")
    def train_chunk(data, model, opt_state):
        batches, key, start = data
        params, static = partition(model)

        def step(carry, xs):
            params, opt_state = carry
            step_index, batch = xs
            dropout_key = jax.random.fold_in(key, step_index)
            batch = jax.lax.with_sharding_constraint(batch, batch_sharded(mesh))
            loss, grads, aux_loss = accumulated_grad(
                lambda p, rows, k: batch_loss_sum(
                    in_compute_dtype(eqx.combine(p, static), precision), rows, k, head_chunk),
                params, batch, grad_accum_steps, dropout_key, batch_sharded(mesh))
            # Gradients split as their parameters: reduce-scattered over fsdp, not all-reduced.
            grads = shard(grads, mesh)
            params, opt_state, grad_norm, finite = guarded_update(optimizer, loss, grads, params,
                                                                  opt_state)
            # Each step's parameters and state split by the rules, as they came in.
            return shard((params, opt_state), mesh), StepStats(loss, grad_norm, finite,
                                                                 aux_loss)

        steps = start + jnp.arange(batches.shape[0])
        with activations_on(mesh):  # the rule is read while this traces
            (params, opt_state), stats = jax.lax.scan(step, (params, opt_state),
                                                      (steps, batches))
        params, opt_state = shard((params, opt_state), mesh)  # else XLA picks the outputs'
        return eqx.combine(params, static), opt_state, stats

    return train_chunk


def activations_on(mesh: Mesh | None):
    """A context that, while a step or evaluation on `mesh` traces, constrains the residual stream
    between blocks by the trainer's activation rule (`activation_rule`); none without a mesh."""
    return activation_sharding(None if mesh is None else activation_rule(mesh))


@eqx.filter_jit
def estimate_loss(model, batches: Int[Array, "n batch block_plus_1"],
                  mesh: Mesh | None = None) -> Float[Array, ""]:
    """Mean loss over a stack of batches (dropout off): the in-training eval, its activations
    placed on `mesh` as the training step's are."""

    def one(_, batch):
        return None, loss_fn(model, batch[:, :-1], batch[:, 1:])

    with activations_on(mesh):
        _, losses = jax.lax.scan(one, None, batches)
    return losses.mean()


@eqx.filter_jit
def masked_loss_sum(model, inputs, targets, mask, mesh: Mesh | None = None):
    with activations_on(mesh):
        logits = model(inputs)
    losses = cross_entropy(logits, predicted(targets, logits))
    return jnp.where(predicted(mask, logits), losses, 0.0).sum()
