"""Data parallelism over a 1-D device mesh: batches split along `data`, the rest replicated."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptzoo.errors import GptzooError


def make_mesh(batch_size: int) -> Mesh:
    devices = jax.devices()
    if batch_size % len(devices):
        raise GptzooError(
            f"trainer.batch_size={batch_size} does not split over {len(devices)} devices; "
            f"use a multiple of {len(devices)}"
        )
    return Mesh(np.array(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def chunk_sharded(mesh: Mesh) -> NamedSharding:
    """A stack of batches `(n_steps, batch, ...)`: each batch split along `data`."""
    return NamedSharding(mesh, PartitionSpec(None, "data"))
