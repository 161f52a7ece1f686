"""Sharding over a (data, fsdp, tensor) mesh, what needs no devices: the mesh section's errors, the
logical-axes table and the rules (training on eight CPU devices, `-m dist`: test_sharding.py)."""

import equinox as eqx
import jax
import pytest
from conftest import RECIPE, ROOT, TINY
from jax.sharding import AbstractMesh, PartitionSpec

import gptzoo
from gptzoo.errors import GptzooError
from gptzoo.models.axes import logical_axes
from gptzoo.models.names import named_leaves
from gptzoo.recipe import MeshConfig
from gptzoo.trainer.sharding import AXES, check_fits, mesh_shape, partition_spec


def test_the_mesh_section_resolves_minus_one_and_refuses_what_does_not_fit():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1), 8) == (2, 4, 1, 1)
    assert mesh_shape(MeshConfig(data=1, fsdp=2, tensor=4), 8) == (1, 2, 4, 1)
    assert mesh_shape(MeshConfig(fsdp=2, expert=2), 8) == (2, 2, 1, 2)
    with pytest.raises(GptzooError, match=r"mesh.data and mesh.fsdp are both -1; .*: --set "
                                          r"mesh.data=1 leaves them to mesh.fsdp$"):
        mesh_shape(MeshConfig(fsdp=-1), 8)  # data is -1 by default
    with pytest.raises(GptzooError, match=r"mesh.data, mesh.fsdp and mesh.tensor are all -1; .*: "
                                          r"--set mesh.data=1 --set mesh.fsdp=1 leaves them to "
                                          r"mesh.tensor$"):
        mesh_shape(MeshConfig(fsdp=-1, tensor=-1), 8)
    with pytest.raises(GptzooError, match=r"mesh.data=2 x mesh.fsdp=2 x mesh.tensor=1 x "
                                          r"mesh.expert=1 does not cover the 8 device\(s\) here; "
                                          r"set one of them to -1"):
        mesh_shape(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(GptzooError, match=r"mesh.data=-1 x mesh.fsdp=3 .* so that their product "
                                          r"divides 8"):
        mesh_shape(MeshConfig(fsdp=3), 8)
    with pytest.raises(GptzooError, match=r"mesh.tensor=0 must be a positive number"):
        mesh_shape(MeshConfig(tensor=0), 8)


def test_a_batch_or_heads_that_do_not_split_are_refused_naming_the_key():
    recipe = gptzoo.load_recipe(RECIPE, {**TINY, "mesh.fsdp": "4", "trainer.batch_size": "6"})
    with pytest.raises(GptzooError, match=r"trainer.batch_size=6 does not split over 8 devices "
                                          r"\(mesh.data=2 x mesh.fsdp=4 x mesh.expert=1\); use a "
                                          r"multiple of 8"):
        check_fits(recipe, mesh_shape(recipe.mesh, 8))  # checked before any mesh is built
    recipe = gptzoo.load_recipe(RECIPE, {**TINY, "mesh.tensor": "4"})  # TINY has 2 heads
    with pytest.raises(GptzooError, match=r"model.n_heads=2 does not split over mesh.tensor=4; "
                                          r"set mesh.tensor to a divisor of 2"):
        check_fits(recipe, mesh_shape(recipe.mesh, 8))


# What the zoo's own components leave without logical axes, replicated on purpose: the spatial
# gating unit's (block_size x block_size) mixing matrix and its bias, and head-QK's projections.
UNDECLARED = {"mlp.sgu.weight", "mlp.sgu.bias", "head_qk.q.weight", "head_qk.k.weight"}


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.py")), ids=lambda p: p.stem)
def test_every_parameter_of_the_zoo_recipes_has_logical_axes(recipe):
    model = eqx.filter_eval_shape(gptzoo.load_recipe(recipe).build, 64, key=jax.random.PRNGKey(0))
    for path, leaf in named_leaves(model, lambda x: isinstance(x, jax.ShapeDtypeStruct)).items():
        axes = logical_axes(path, leaf.ndim)
        assert (axes is None) == any(path.endswith(u) for u in UNDECLARED), path
        assert axes is None or len(axes) == leaf.ndim


def test_the_rules_split_heads_and_mlp_over_tensor_and_the_rest_over_fsdp():
    mesh = AbstractMesh((1, 2, 4), ("data", "fsdp", "tensor"))
    assert partition_spec("blocks.0.attention.qkv.weight", (32, 96), mesh) == PartitionSpec(
        "fsdp", "tensor")
    assert partition_spec("blocks.0.attention.out.weight", (32, 32), mesh) == PartitionSpec(
        "tensor", "fsdp")
    assert partition_spec("blocks.0.mlp.gate_up.weight", (32, 256), mesh) == PartitionSpec(
        "fsdp", "tensor")
    # Blocks stacked for lax.scan: the extra leading axis is `layers`, never split.
    assert partition_spec("blocks.layers.mlp.down.weight", (6, 128, 32), mesh) == PartitionSpec(
        None, "tensor", "fsdp")
    # A vocabulary of 65 does not split over 4 devices: that dimension stays whole.
    assert partition_spec("token_embedding.weight", (65, 32), mesh) == PartitionSpec(None, "fsdp")
    assert partition_spec("token_embedding.weight", (64, 32), mesh) == PartitionSpec(
        "tensor", "fsdp")
    # Adam's statistics split as their parameter; its step count and a user's own part do not.
    assert partition_spec("1.0.mu.blocks.0.attention.qkv.weight", (32, 96), mesh) == (
        partition_spec("blocks.0.attention.qkv.weight", (32, 96), mesh))
    assert partition_spec("1.0.count", (), mesh) == PartitionSpec()
    assert partition_spec("blocks.0.mlp.my_gate.weight", (32, 96), mesh) == PartitionSpec()
    assert partition_spec("blocks.0.attn_norm.weight", (32,), mesh) == PartitionSpec(None)


def test_a_mixtures_experts_split_over_the_expert_axis():
    # Stacked experts' gate_up is (layers, experts, d_model, 2 d_hidden), down (layers, experts,
    # d_hidden, d_model); the router (layers, d_model, experts) keeps its experts whole.
    mesh = AbstractMesh((1, 2, 1, 4), AXES)
    assert partition_spec("blocks.layers.mlp.experts.gate_up", (3, 8, 32, 96), mesh) == (
        PartitionSpec(None, "expert", "fsdp", None))
    assert partition_spec("blocks.layers.mlp.experts.down", (3, 8, 48, 32), mesh) == (
        PartitionSpec(None, "expert", None, "fsdp"))
    assert partition_spec("blocks.layers.mlp.router.weight", (3, 32, 8), mesh) == (
        PartitionSpec(None, "fsdp", None))
    # Three experts do not split over four devices: each device holds them all.
    assert partition_spec("blocks.layers.mlp.experts.gate_up", (3, 3, 32, 96), mesh) == (
        PartitionSpec(None, None, "fsdp", None))
