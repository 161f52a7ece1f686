"""Activations constrained by logical axes: nothing without a rule; under the trainer's rule, the
residual stream at every block boundary of the train step and both evaluations, scanned or not,
with its batch over `data` x `fsdp` x `expert` and its positions and width whole.

The step is traced (not compiled) on an abstract eight-device mesh, so no devices are needed; the
`-m dist` runs of tests/test_sharding.py train with these constraints on eight real ones."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from gptzoo.models import gpt2
from gptzoo.nn.activation_sharding import activation_sharding, constrain
from gptzoo.trainer.sharding import AXES, activation_rule
from gptzoo.trainer.step import estimate_loss, make_train_chunk, masked_loss_sum

MESHES = {"data2_fsdp4": (2, 4, 1, 1), "fsdp2_tensor4": (1, 2, 4, 1)}
RESIDUAL = PartitionSpec(("data", "fsdp", "expert"), None, None)
N_LAYERS, BATCH, SEQ, D_MODEL = 2, 8, 16, 32
BATCHES = jnp.zeros((1, BATCH, SEQ + 1), jnp.int32)  # one step's batch of windows


def abstract_mesh(shape) -> AbstractMesh:
    return AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def tiny(scan_layers: bool):
    return gpt2(65, n_layers=N_LAYERS, n_heads=4, d_model=D_MODEL, block_size=SEQ,
                scan_layers=scan_layers, key=jax.random.PRNGKey(0))


def constraints(jaxpr, scans=()):
    """`(operand shape, partition spec, lengths of the enclosing scans)` of every sharding
    constraint in `jaxpr` and the jaxprs nested in it (jit, scan, cond and their transposes)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            yield eqn.invars[0].aval.shape, eqn.params["sharding"].spec, scans
        inner = scans + (eqn.params["length"],) if eqn.primitive.name == "scan" else scans
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    yield from constraints(sub, inner)


def residual_constraints(jaxpr) -> list:
    return [c for c in constraints(jaxpr) if c[0] == (BATCH, SEQ, D_MODEL)]


def test_without_a_rule_constrain_returns_its_input_and_the_model_adds_no_constraint():
    x = jnp.ones((BATCH, SEQ, D_MODEL))
    assert constrain(x, ("batch", "seq", "embed")) is x
    for scan_layers in (True, False):
        jaxpr = eqx.filter_make_jaxpr(tiny(scan_layers))(BATCHES[0, :, :-1])[0]
        assert list(constraints(jaxpr)) == []


def test_the_trainer_rule_splits_the_batch_over_data_fsdp_and_expert_only():
    rule = activation_rule(abstract_mesh((2, 2, 2, 1)))
    assert rule(("batch", "seq", "embed")).spec == RESIDUAL
    assert rule(("seq", "embed")).spec == PartitionSpec(None, None)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_the_train_step_constrains_the_residual_stream_after_every_block(mesh, scan_layers):
    """Each block's output and, in the backward pass, its cotangent: once per block unrolled;
    scanned, once in the layer scan's body and once in its transpose's."""
    optimizer = optax.sgd(0.1)
    model = tiny(scan_layers)
    chunk = make_train_chunk(optimizer, abstract_mesh(MESHES[mesh]))
    jaxpr = eqx.filter_make_jaxpr(chunk)(
        (BATCHES, jax.random.PRNGKey(1), jnp.int32(0)), model,
        optimizer.init(eqx.filter(model, eqx.is_array)))[0]
    found = residual_constraints(jaxpr)
    assert [spec for _, spec, _ in found] == [RESIDUAL] * (2 if scan_layers else 2 * N_LAYERS)
    if scan_layers:  # inside the scan over the layers, within the scan over the chunk's steps
        assert all(scans == (len(BATCHES), N_LAYERS) for _, _, scans in found)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_both_evaluations_constrain_the_residual_stream_on_a_mesh_and_not_without(scan_layers):
    model, mesh = tiny(scan_layers), abstract_mesh(MESHES["fsdp2_tensor4"])
    inputs, targets = BATCHES[0, :, :-1], BATCHES[0, :, 1:]
    per_call = 1 if scan_layers else N_LAYERS
    for mesh_arg, expected in ((mesh, [RESIDUAL] * per_call), (None, [])):
        estimate = eqx.filter_make_jaxpr(estimate_loss)(model, BATCHES, mesh_arg)[0]
        masked = eqx.filter_make_jaxpr(masked_loss_sum)(model, inputs, targets, targets >= 0,
                                                        mesh_arg)[0]
        for jaxpr in (estimate, masked):
            assert [spec for _, spec, _ in residual_constraints(jaxpr)] == expected


def test_one_example_under_vmap_leaves_the_mapped_batch_unconstrained():
    """Per example the residual is `(seq, d_model)`, constrained as ("seq", "embed"); `vmap`
    over examples adds the batch as an unconstrained dimension rather than replicating it."""
    model, mesh = tiny(False), abstract_mesh(MESHES["data2_fsdp4"])

    def run(tokens):
        with activation_sharding(activation_rule(mesh)):
            return jax.vmap(model)(tokens)

    found = residual_constraints(eqx.filter_make_jaxpr(run)(BATCHES[0, :, :-1])[0])
    assert [spec for _, spec, _ in found] == [
        PartitionSpec(PartitionSpec.UNCONSTRAINED, None, None)] * N_LAYERS
