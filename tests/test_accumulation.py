"""Gradient accumulation (`trainer.grad_accum_steps`): a step over 4 micro-batches equals one
step over the whole batch, computed independently with a plain gradient of the mean loss, also
for a model that predicts only its last positions; micro-batches split over every data shard."""

import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import numpy as np
import optax
import pytest
from conftest import EIGHT_DEVICES, RECIPE, ROOT

import gptzoo
from gptzoo.errors import GptzooError
from gptzoo.recipe import MeshConfig
from gptzoo.trainer.sharding import check_fits, make_mesh
from gptzoo.trainer.step import loss_fn, make_train_chunk

SMALL = {"model.n_layers": "1", "model.d_model": "32", "model.n_heads": "2",
         "model.block_size": "16"}
PERCEIVER = ROOT / "recipes" / "perceiver_ar_shakespeare.py"


def reference_steps(model, optimizer, batches):
    """Plain training: the gradient of the mean loss over each whole batch, then the update."""
    params, static = eqx.partition(model, eqx.is_array)
    state, losses = optimizer.init(params), []

    def mean_loss(params, batch):
        return loss_fn(eqx.combine(params, static), batch[:, :-1], batch[:, 1:])

    for batch in batches:
        loss, grads = eqx.filter_value_and_grad(mean_loss)(params, batch)
        updates, state = optimizer.update(grads, state, params)
        params, losses = optax.apply_updates(params, updates), losses + [float(loss)]
    return eqx.combine(params, static), losses


def mesh_of():
    """The default recipe's mesh: every device on `data`."""
    return make_mesh(MeshConfig())


@pytest.mark.parametrize("path,extra", [(RECIPE, {}), (PERCEIVER, {"model.n_latents": "4"})],
                         ids=["gpt2", "perceiver_ar"])
def test_four_micro_batches_equal_one_step_on_the_whole_batch(path, extra):
    recipe = gptzoo.load_recipe(path, {**SMALL, **extra})
    model = recipe.build(65, key=jax.random.PRNGKey(0))
    batches = jax.random.randint(jax.random.PRNGKey(1), (3, 16, 17), 0, 65)
    optimizer = optax.sgd(0.5)  # plain steps: the parameters show the gradients undistorted
    expected, losses = reference_steps(model, optimizer, batches)  # first: the chunk donates
    chunk = make_train_chunk(optimizer, mesh_of(), grad_accum_steps=4)
    trained, _, stats = chunk((batches, jax.random.PRNGKey(2), jax.numpy.int32(0)),
                              model, optimizer.init(eqx.filter(model, eqx.is_array)))
    np.testing.assert_allclose(stats.loss, losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(eqx.filter(trained, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(expected, eqx.is_array)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_micro_batch_that_does_not_split_over_the_shards_is_refused():
    recipe = gptzoo.load_recipe(RECIPE, {"trainer.batch_schedule": "[[0, 8], [5, 16]]",
                                         "trainer.grad_accum_steps": "2"})
    check_fits(recipe, (1, 1, 1, 1))  # one device: any size splits
    check_fits(recipe, (2, 2, 1, 1))  # micro-batches of 4 and 8 rows over 4 devices
    with pytest.raises(GptzooError, match=r"a micro-batch of trainer.batch_schedule's batch 8 / "
                                          r"trainer.grad_accum_steps=2 = 4 rows does not split "
                                          r"over 8 devices \(mesh.data=8 x mesh.fsdp=1 x "
                                          r"mesh.expert=1\); use a multiple of 16"):
        check_fits(recipe, (8, 1, 1, 1))
    with pytest.raises(GptzooError, match="trainer.grad_accum_steps"):
        gptzoo.load_recipe(RECIPE, {"trainer.batch_size": "12", "trainer.grad_accum_steps": "8"})


@pytest.mark.dist  # eight devices: nox -s dist
def test_micro_batches_spread_over_eight_devices_match_one_device():
    """On 8 devices a global batch of 32 in 4 micro-batches puts 1 row of each micro-batch on
    every device; the step equals the single-device reference, and a micro-batch of 4 rows
    (16 / 4) over 8 devices is refused with a one-line error."""
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT / "tests")!r})
        import jax, numpy as np, optax, equinox as eqx, gptzoo
        from test_accumulation import SMALL, mesh_of, reference_steps
        from gptzoo.errors import GptzooError
        from gptzoo.trainer.sharding import check_fits, chunk_sharded
        from gptzoo.trainer.step import make_train_chunk
        assert len(jax.devices()) == 8
        model = gptzoo.load_recipe({str(RECIPE)!r}, SMALL).build(65, key=jax.random.PRNGKey(0))
        mesh, optimizer = mesh_of(), optax.sgd(0.5)
        batches = jax.random.randint(jax.random.PRNGKey(1), (2, 32, 17), 0, 65)
        expected, losses = reference_steps(model, optimizer, batches)
        chunk = make_train_chunk(optimizer, mesh, grad_accum_steps=4)
        trained, _, stats = chunk((jax.device_put(batches, chunk_sharded(mesh)),
                                   jax.random.PRNGKey(2), jax.numpy.int32(0)),
                                  model, optimizer.init(eqx.filter(model, eqx.is_array)))
        np.testing.assert_allclose(stats.loss, losses, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(eqx.filter(trained, eqx.is_array)),
                        jax.tree.leaves(eqx.filter(expected, eqx.is_array))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        recipe = gptzoo.load_recipe({str(RECIPE)!r}, {{"trainer.batch_size": "16",
                                                      "trainer.grad_accum_steps": "4"}})
        try:
            check_fits(recipe, mesh.devices.shape)
        except GptzooError as e:
            print("refused:", e)
    """)
    env = {**EIGHT_DEVICES, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("refused: a micro-batch of trainer.batch_size=16 / trainer.grad_accum_steps=4 = 4 "
            "rows does not split over 8 devices") in done.stdout
