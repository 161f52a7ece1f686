"""Collectives in the compiled train step on eight CPU devices, with the residual stream
constrained at block boundaries (as the trainer does) and without: how many all-gathers,
all-reduces, all-to-alls and collective-permutes XLA's partitioner puts in the step of a small
model, per mesh, scanned and unrolled. Counts are of ops in the compiled module (an op in the
body of the scan over layers counts once), not of bytes or time.

    JAX_PLATFORMS=cpu python bench/bench_collectives.py
"""

import collections
import re

import jax

jax.config.update("jax_num_cpu_devices", 8)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import gptzoo.trainer.step  # noqa: E402
from gptzoo.models import gpt2  # noqa: E402
from gptzoo.trainer.sharding import AXES, chunk_sharded, shard  # noqa: E402

MESHES = {"data2_fsdp4": (2, 4, 1), "data2_tensor4": (2, 1, 4), "fsdp2_tensor4": (1, 2, 4)}
COLLECTIVE = re.compile(r" (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                        r"(?:-start)?\(")


def collectives(mesh, scan_layers: bool) -> dict[str, int]:
    model = gpt2(65, n_layers=4, n_heads=4, d_model=128, block_size=64,
                 scan_layers=scan_layers, key=jax.random.PRNGKey(0))
    model, optimizer = shard(model, mesh), optax.adamw(1e-3)
    state = shard(optimizer.init(eqx.filter(model, eqx.is_array)), mesh)
    batches = jax.device_put(jnp.zeros((1, 16, 65), jnp.int32), chunk_sharded(mesh))
    chunk = gptzoo.trainer.step.make_train_chunk(optimizer, mesh)
    lowered = chunk.lower((batches, jax.random.PRNGKey(1), jnp.int32(0)), model, state)
    return dict(sorted(collections.Counter(
        COLLECTIVE.findall(lowered.lowered.compile().as_text())).items()))


def main():
    constrained = gptzoo.trainer.step.activation_rule
    unconstrained = lambda mesh: lambda axes: None  # noqa: E731 (a rule that constrains nothing)
    for name, shape in MESHES.items():
        mesh = jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
        for scan_layers in (True, False):
            for label, rule in (("constrained", constrained), ("unconstrained", unconstrained)):
                gptzoo.trainer.step.activation_rule = rule
                layout = "scanned" if scan_layers else "unrolled"
                print(f"{name:14} {layout:9} {label:14} {collectives(mesh, scan_layers)}")


if __name__ == "__main__":
    main()
