"""LoRA adapters on a model: `add_lora` puts a `LoRALinear` on every projection whose module path
a regular expression finds, `split_adapter` separates the adapters (what trains) from the frozen
rest, and `merge_lora` adds them into the weights.

Module paths are per layer (`blocks.3.attention.qkv`), whether the model scans its layers or
not: a scanned `Stack` gets an adapter on a projection in all of its layers or none.
"""

import re
import zlib
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp

from gptzoo.errors import GptzooError
from gptzoo.lora.config import PROJECTIONS, compile_targets
from gptzoo.models.names import path_name
from gptzoo.nn import Linear, Stack
from gptzoo.nn.leaves import is_array_or_shape
from gptzoo.nn.lora import LoRALinear

ADAPTER_LEAVES = ("lora_a", "lora_b")


def add_lora(model, settings, splits: Mapping[str, tuple[int, ...]] | None = None, *, key):
    """`model` with every `Linear` whose per-layer module path `settings.targets` finds
    (`re.search`) made a `LoRALinear` of rank `settings.rank`, scale `settings.scale` and input
    dropout `settings.dropout`. `splits` gives the fused parts' widths of some paths (one adapter
    per part). Each adapter's `lora_a` is drawn from `key` folded with its path, so a scanned
    and an unscanned model start alike. One-line errors when nothing matches, or part of a
    scanned stack does."""
    pattern, splits = compile_targets(settings.targets), splits or {}
    found: list[str] = []

    def adapt(linear: Linear, names: list[str]):
        hits = [bool(pattern.search(n)) for n in names]
        if not any(hits):
            return linear
        if not all(hits):
            raise GptzooError(
                f"lora.targets={settings.targets!r} matches {sum(hits)} of the {len(names)} "
                f"scanned layers' {names[0]}: a scanned stack adapts all of its layers or none; "
                "match every layer, or --set model.scan_layers=false")
        if settings.dropout and not re.search(PROJECTIONS, names[0]):
            raise GptzooError(f"lora.dropout={settings.dropout} acts on attention and MLP "
                              f"projections only, and lora.targets also matches {names[0]}; "
                              "--set lora.dropout=0 or narrow lora.targets")
        found.extend(names)
        keys = [jax.random.fold_in(key, zlib.crc32(n.encode())) for n in names]
        return LoRALinear(linear, settings.rank, scale=settings.scale, dropout=settings.dropout,
                          splits=splits.get(names[0]),
                          key=jnp.stack(keys) if linear.weight.ndim > 2 else keys[0])

    model = _map_projections(model, adapt)
    if not found:
        names = projection_paths(model)
        shown = [n for n in names if not re.search(r"\.[1-9]\d*\.", n)][:8]
        raise GptzooError(f"lora.targets={settings.targets!r} matches no projection; the model's "
                          f"projections include {', '.join(shown)}; fix it with --set "
                          "lora.targets=...")
    return model


def projection_paths(model) -> list[str]:
    """The per-layer module path of every `Linear` (or `LoRALinear`) of `model`."""
    names: list[str] = []

    def note(linear, paths):
        names.extend(paths)
        return linear

    _map_projections(model, note, is_projection=lambda x: isinstance(x, Linear | LoRALinear))
    return names


def _map_projections(model, fn, is_projection=lambda x: isinstance(x, Linear)):
    """`model` with each projection replaced by `fn(projection, its per-layer paths)`: one path,
    or a scanned stack's `n_layers` (`blocks.0.mlp.up`, ..., `blocks.{n-1}.mlp.up`)."""

    def in_stack(stack_name: str, n_layers: int):
        def one(path, node):
            if not is_projection(node):
                return node
            return fn(node, [f"{stack_name}.{i}.{path_name(path)}" for i in range(n_layers)])
        return one

    def one(path, node):
        if isinstance(node, Stack):
            layers = jax.tree_util.tree_map_with_path(
                in_stack(path_name(path), node.n_layers), node.layers, is_leaf=is_projection)
            return eqx.tree_at(lambda s: s.layers, node, layers)
        return fn(node, [path_name(path)]) if is_projection(node) else node

    return jax.tree_util.tree_map_with_path(
        one, model, is_leaf=lambda x: isinstance(x, Stack) or is_projection(x))


def _is_adapter_leaf(path, leaf) -> bool:
    return is_array_or_shape(leaf) and getattr(path[-1], "name", None) in ADAPTER_LEAVES


def adapter_spec(model):
    """A filter spec of `model`: True at the adapters' arrays, False elsewhere."""
    return jax.tree_util.tree_map_with_path(_is_adapter_leaf, model)


def split_adapter(model):
    """`(adapters, rest)` as `eqx.partition` gives them: what a LoRA run trains, what it keeps."""
    return eqx.partition(model, adapter_spec(model))


def adapter_of(model):
    """The adapters' arrays of `model` alone (None elsewhere): what a LoRA run checkpoints."""
    return split_adapter(model)[0]


def has_adapters(model) -> bool:
    is_lora = lambda x: isinstance(x, LoRALinear)  # noqa: E731
    return any(map(is_lora, jax.tree.leaves(model, is_leaf=is_lora)))


def merge_lora(model):
    """`model` with every `LoRALinear` replaced by the `Linear` that computes the same: the
    update added into the weight once, so the model runs as fast as the one it adapts."""
    is_lora = lambda x: isinstance(x, LoRALinear)  # noqa: E731
    return jax.tree.map(lambda x: x.merged() if is_lora(x) else x, model, is_leaf=is_lora)
