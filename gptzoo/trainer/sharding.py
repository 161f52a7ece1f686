"""Where arrays live: a mesh of devices with named axes `data`, `fsdp`, `tensor` and `expert`, and
the rules that place each parameter, optimizer statistic and batch on it.

The batch is split over `data` x `fsdp` x `expert`. Parameters and their optimizer statistics
are split according to their logical axes (`gptzoo.models.axes`, and each family's own) by
`RULES`: FSDP shards them over `fsdp` (XLA gathers each weight where the step uses it and
reduce-scatters its gradient), tensor parallelism splits attention heads and the MLP's hidden
units over `tensor` (column-split in, row-split out, as in Megatron-LM), and a mixture's stacked
experts are split over `expert` (each device holds whole experts; XLA moves what the tokens
routed elsewhere need). A parameter without logical axes is replicated.

Activations are placed by logical axis too (`activation_rule`, installed inside the jitted step and
evaluation): the residual stream between blocks has its batch over `data` x `fsdp` x `expert` and
is whole along its positions and width.
"""

import math
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptzoo.data.batch_schedule import BatchSchedule, checked_schedule
from gptzoo.errors import GptzooError
from gptzoo.models.axes import logical_axes
from gptzoo.models.config import ModelConfig
from gptzoo.models.names import path_name
from gptzoo.recipe import MeshConfig, Recipe

AXES = ("data", "fsdp", "tensor", "expert")
BATCH = ("data", "fsdp", "expert")

# Logical axis -> the mesh axes its dimension is split over (MaxText's logical_axis_rules);
# a logical axis not listed (layers, positions, norm) is never split.
RULES: dict[str, tuple[str, ...]] = {
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "experts": ("expert",),
}


# Logical activation axis -> mesh axes (`gptzoo.nn.activation_sharding`); one not listed (`seq`,
# `embed`) is never split. So the residual stream is replicated over `tensor`, as Megatron-LM
# keeps it between its column- and row-split layers, and not split over `fsdp` beyond the batch:
# FSDP splits weights, not activations.
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {"batch": BATCH}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int, int]:
    """`(data, fsdp, tensor, expert)` sizes from the recipe's `mesh` section, its one `-1` filled
    with the devices left; a one-line error names the key to change when they do not fit
    `n_devices`."""
    sizes = {axis: getattr(cfg, axis) for axis in AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    bad = [axis for axis, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise GptzooError(f"mesh.{bad[0]}={sizes[bad[0]]} must be a positive number of devices "
                          f"or -1 (the devices left); fix it with --set mesh.{bad[0]}=...")
    if len(free) > 1:  # data is -1 by default: keep the axis the user chose, the last one
        named = ", ".join(f"mesh.{a}" for a in free[:-1]) + f" and mesh.{free[-1]}"
        fixes = " ".join(f"--set mesh.{a}=1" for a in free[:-1])
        raise GptzooError(f"{named} are {'both' if len(free) == 2 else 'all'} -1; only one axis "
                          f"can take the devices left: {fixes} leaves them to mesh.{free[-1]}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free and n_devices % fixed == 0:
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        shown = " x ".join(f"mesh.{a}={sizes[a]}" for a in AXES)
        hint = (f"choose the other axes so that their product divides {n_devices}"
                if free else "set one of them to -1 to take the devices left")
        raise GptzooError(f"{shown} does not cover the {n_devices} device(s) here; {hint}")
    return tuple(sizes[axis] for axis in AXES)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of the recipe's `mesh` section over `devices` (default: all of them, across
    processes)."""
    devices = jax.devices() if devices is None else devices
    return _mesh(mesh_shape(cfg, len(devices)), devices)


def check_fits(recipe: Recipe, shape: tuple[int, ...]) -> BatchSchedule:
    """The recipe's batch schedule, once each of its batches (and micro-batches) splits over
    `data` x `fsdp` x `expert` of a mesh of `shape` and its heads over `tensor`; else a one-line
    error naming the key to change."""
    data, fsdp, tensor, expert = shape
    cfg = recipe.trainer
    schedule = checked_schedule(cfg.batch_size, cfg.batch_schedule, cfg.grad_accum_steps,
                                data * fsdp * expert,
                                f"mesh.data={data} x mesh.fsdp={fsdp} x mesh.expert={expert}")
    n_heads = recipe.model.n_heads if isinstance(recipe.model, ModelConfig) else None
    if n_heads is not None and n_heads % tensor:
        raise GptzooError(f"model.n_heads={n_heads} does not split over mesh.tensor={tensor}; "
                          f"set mesh.tensor to a divisor of {n_heads}")
    return schedule


def eval_mesh(cfg: MeshConfig) -> Mesh:
    """The mesh to evaluate a run on: its `mesh` section's when that fits the devices here (a run
    trained on eight devices may be evaluated on one), else every device on `fsdp`."""
    devices = jax.devices()
    try:
        shape = mesh_shape(cfg, len(devices))
    except GptzooError:
        shape = (1, len(devices), 1, 1)
    return _mesh(shape, devices)


def _mesh(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> Mesh:
    # Auto axes: XLA propagates shardings from the placed inputs and the constraints below.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_shards(mesh: Mesh) -> int:
    """How many pieces a batch is split into."""
    return math.prod(mesh.shape[axis] for axis in BATCH)


def partition_spec(path: str, shape: tuple[int, ...], mesh) -> PartitionSpec:
    """How `RULES` split the parameter (or optimizer statistic) at `path` over `mesh`.

    A dimension whose size the mesh axes do not divide (a vocabulary of 65 over 4 devices) is
    replicated rather than split unevenly; so is one whose mesh axes an earlier dimension took.
    """
    axes = logical_axes(path, len(shape))
    if axes is None:
        return PartitionSpec()
    spec, used = [], set()
    for name, size in zip(axes, shape, strict=True):
        split = tuple(a for a in RULES.get(name, ()) if mesh.shape[a] > 1 and a not in used)
        if not split or size % math.prod(mesh.shape[a] for a in split):
            spec.append(None)
            continue
        spec.append(split[0] if len(split) == 1 else split)
        used.update(split)
    return PartitionSpec(*spec)


def shardings(tree, mesh: Mesh):
    """A `NamedSharding` for each array of `tree`, a model, its gradients or an optimizer state,
    by module path; None for its other leaves. An optimizer statistic's path ends with its
    parameter's (`1.0.mu.blocks.0.mlp.up.weight`), so it is split as its parameter is; scalars
    such as the step count are replicated."""

    def one(path, leaf):
        return _sharding(path, leaf, mesh) if eqx.is_array(leaf) else None

    return jax.tree_util.tree_map_with_path(one, tree)


def shard(tree, mesh: Mesh):
    """`tree` placed by `shardings`: constrained to it inside `jit`; moved there outside, also
    from a device it was committed to (a model loaded from a checkpoint)."""
    dynamic, static = eqx.partition(tree, eqx.is_array)
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(dynamic))
    place = jax.lax.with_sharding_constraint if traced else jax.device_put
    return eqx.combine(place(dynamic, shardings(dynamic, mesh)), static)


def build_sharded(build: Callable[[], eqx.Module], mesh: Mesh) -> eqx.Module:
    """`build()` placed by `shardings`. On a mesh of several devices it runs inside one jitted
    program whose outputs are constrained to their shardings, so each device creates only its
    own shards and none first holds a whole weight (levanter and MaxText initialise so); the
    weights equal an eager build's to within rounding. On one device, `build()` itself."""
    if mesh.size == 1:
        return shard(build(), mesh)
    return eqx.filter_jit(lambda: shard(build(), mesh))()


def _sharding(path, leaf, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(path_name(path), leaf.shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """A batch `(batch, ...)` split over `data` x `fsdp` x `expert`."""
    return NamedSharding(mesh, PartitionSpec(BATCH))


def activation_rule(mesh: Mesh) -> Callable[[tuple[str | None, ...]], NamedSharding]:
    """The rule to install with `gptzoo.nn.activation_sharding.activation_sharding` for a step on
    `mesh`: logical activation axes to a `NamedSharding` by `ACTIVATION_RULES`."""

    def rule(axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(*(ACTIVATION_RULES.get(a) for a in axes)))

    return rule


def chunk_sharded(mesh: Mesh) -> NamedSharding:
    """A stack of batches `(n_steps, batch, ...)`: each batch split over `data` x `fsdp` x
    `expert`."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH))
