"""Logical axes of the zoo's parameters: what each dimension of a weight means (`vocab`, `embed`,
`heads`, `mlp`, ...), declared by module path, so that no component names a device: here the
components' and the `GPT` layout's, shared by every model; in a family (`Family.logical_axes`)
the parameters only its models have. The trainer's rules (`gptzoo.trainer.sharding`) map these
names onto mesh axes.

A pattern matches the end of a parameter's path segment by segment, each segment an `fnmatch`
pattern: `*attention.qkv.weight` matches `blocks.3.attention.qkv.weight` and, in an optimizer
state, `1.0.mu.blocks.3.attention.qkv.weight`. A parameter with more leading dimensions than its
pattern names (blocks stacked for `lax.scan`: `blocks.layers.attention.qkv.weight`, shape
`(n_layers, d_model, 3 d_model)`) gets `layers` for each extra one. A parameter no pattern matches,
such as a user's own component, has no logical axes: the trainer replicates it.
"""

import fnmatch

from gptzoo.models.registry import ARCHITECTURES

# Linear weights are stored (in, out). The fused q/k/v projection's columns are
# [q heads | k heads | v heads] and GLU's gate_up's [gate | up]: both count as split heads or
# hidden units, although a split of their columns does not fall on head or gate boundaries.
LOGICAL_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("token_embedding.weight", ("vocab", "embed")),
    ("position_embedding.weight", ("positions", "embed")),
    ("head.weight", ("embed", "vocab")),
    ("*attention.qkv.weight", ("embed", "heads")),
    ("*attention.qkv.bias", ("heads",)),
    ("*attention.q.weight", ("embed", "heads")),  # Perceiver AR's cross-attention
    ("*attention.q.bias", ("heads",)),
    ("*attention.kv.weight", ("embed", "kv_heads")),
    ("*attention.kv.bias", ("kv_heads",)),
    ("*attention.out.weight", ("heads", "embed")),
    ("*attention.out.bias", ("embed",)),
    ("*mlp.up.weight", ("embed", "mlp")),
    ("*mlp.up.bias", ("mlp",)),
    ("*mlp.gate_up.weight", ("embed", "mlp")),
    ("*mlp.gate_up.bias", ("mlp",)),
    ("*mlp.down.weight", ("mlp", "embed")),
    ("*mlp.down.bias", ("embed",)),
    # A mixture of experts (nn.MoEMLP): the router's columns are experts, but it is small and
    # its softmax reads them all, so they stay whole; the experts' leading axis is split.
    ("*mlp.router.weight", ("embed", "router")),
    ("*mlp.experts.gate_up", ("experts", "embed", "mlp")),
    ("*mlp.experts.down", ("experts", "mlp", "embed")),
    ("*norm.weight", ("norm",)),
    ("*norm.bias", ("norm",)),
    ("*norm.scale", ("norm",)),
)


def logical_axes(path: str, ndim: int) -> tuple[str, ...] | None:
    """The logical axis of each of the `ndim` dimensions of the parameter at `path` (a module path
    such as `blocks.0.mlp.up.weight`), or None when no pattern declares it or it has fewer
    dimensions than its pattern names (e.g. a factored optimizer statistic). The families'
    patterns are tried before the shared ones."""
    segments = path.split(".")
    families = [pair for family in ARCHITECTURES.values() for pair in family.logical_axes]
    for pattern, axes in (*families, *LOGICAL_AXES):
        wanted = pattern.split(".")
        tail = segments[-len(wanted):]
        if len(tail) == len(wanted) and all(map(fnmatch.fnmatchcase, tail, wanted)):
            return ("layers",) * (ndim - len(axes)) + axes if ndim >= len(axes) else None
    return None
