"""Parameters by module path (`blocks.3.attention.qkv.weight`): the names that tie a model to
weights from elsewhere (another run, a Hugging Face checkpoint) whatever the order of fields.

A model that scans its layers holds them stacked (`blocks.layers.attention.qkv.weight`, shape
`(n_layers, ...)`); `per_layer_leaves` and `replace_per_layer` name its weights per layer, as an
unscanned model's, so weights move between the two layouts and to and from other formats."""

from collections.abc import Callable, Mapping

import equinox as eqx
import jax

from gptzoo.nn.stack import same_layout, unstacked


def named_leaves(tree, keep: Callable[[object], bool] = eqx.is_array) -> dict:
    """The leaves of `tree` that `keep` accepts (default: arrays) by module path."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_name(path): leaf for path, leaf in flat if keep(leaf)}


def path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def is_shape(leaf) -> bool:
    return isinstance(leaf, jax.ShapeDtypeStruct)


def shapes(named: Mapping) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` of a name -> array (or shape struct) map."""
    return {name: tuple(a.shape) for name, a in named.items()}


def shape_differences(expected: Mapping, given: Mapping, given_name: str,
                      expected_name: str) -> list[str]:
    """What differs between two name -> shape maps, one phrase per name:
    "checkpoint has blocks.0.mlp.up.weight (128, 512); the recipe builds (128, 384)"."""
    lines = []
    for name in sorted(expected.keys() | given.keys()):
        mine, theirs = expected.get(name), given.get(name)
        if theirs is None:
            lines.append(f"{expected_name} builds {name} {tuple(mine)}, {given_name} lacks it")
        elif mine is None:
            lines.append(f"{given_name} has {name} {tuple(theirs)}; {expected_name} "
                         "builds no such parameter")
        elif tuple(mine) != tuple(theirs):
            lines.append(f"{given_name} has {name} {tuple(theirs)}; {expected_name} "
                         f"builds {tuple(mine)}")
    return lines


def replace_arrays(template, arrays: Mapping):
    """`template` (a model, or one of shapes from `eqx.filter_eval_shape`) with each array or
    shape leaf replaced by `arrays[its module path]`; other leaves (dropout rates) kept."""

    def one(path, leaf):
        return arrays[path_name(path)] if eqx.is_array(leaf) or is_shape(leaf) else leaf

    return jax.tree_util.tree_map_with_path(one, template)


def per_layer_leaves(tree, keep: Callable[[object], bool] = eqx.is_array) -> dict:
    """`named_leaves` with every `Stack` seen as its blocks (`blocks.3.mlp.up.weight`), whether
    `tree` scans its layers or not."""
    return named_leaves(unstacked(tree), keep)


def replace_per_layer(template, arrays: Mapping):
    """`replace_arrays` from per-layer names (`per_layer_leaves`), in `template`'s layout."""
    return same_layout(template, replace_arrays(unstacked(template), arrays))
