"""Sharding over a (data, fsdp, tensor) mesh (`-m dist`): training on eight CPU devices against
one, restored across meshes, and bf16 with gradient accumulation on an fsdp x tensor mesh against
one device. (The mesh section's errors, the logical-axes table and the rules:
test_sharding_rules.py.)"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import EIGHT_DEVICES, RECIPE, ROOT, TINY, gptzoo_cli, set_args

import gptzoo
from gptzoo.trainer import evaluate_run

# --- eight CPU devices against one (about 5 minutes on a busy 2-core machine: nox -s dist) ---

MESHES = {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1), "data2_tensor4": (2, 1, 4),
          "fsdp2_tensor4": (1, 2, 4)}
EVALUATED = ("one", "fsdp2_tensor4")  # its mesh does not fit one device: eval falls back
# Scanned layers (the recipe unrolls them on CPU): the layout a many-device run would use.
RUN = {**TINY, "model.n_heads": "4", "model.scan_layers": "true", "trainer.max_steps": "10",
       "trainer.log_interval": "1",
       "trainer.checkpoint_interval": "5", "trainer.eval_interval": "10"}

# Runs in a subprocess with eight CPU devices: every mesh of MESHES, then the one-device run's
# step-5 checkpoint resumed with FSDP over all eight; prints as JSON each mesh's shard shapes and
# what `gptzoo eval` finds for two runs on the eight devices.
_ON_EIGHT_DEVICES = """
import json, sys
from pathlib import Path
import gptzoo
from gptzoo.trainer import evaluate_run
from gptzoo.trainer.checkpoint import named_arrays
from gptzoo.trainer.prepared import prepare

out, overrides, meshes = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
back, recipe_path, evaluated = sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
shards = {}
for name, (data, fsdp, tensor) in meshes.items():
    mesh = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor}
    recipe = gptzoo.load_recipe(recipe_path, {**overrides, **mesh})
    model = gptzoo.train(recipe, out / name).model
    state = prepare(recipe, log=lambda *a: None).opt_state
    arrays = {**named_arrays(model),
              **{"opt_state." + k: v for k, v in named_arrays(state).items()}}
    shards[name] = {k: [list(s.data.shape) for s in a.addressable_shards]
                    for k, a in arrays.items()}
recipe = gptzoo.load_recipe(recipe_path, {**overrides, "mesh.data": 1, "mesh.fsdp": -1})
gptzoo.train(recipe, back, resume=True)
evals = {name: evaluate_run(out / name).loss for name in evaluated}
print(json.dumps({"vocab": model.token_embedding.weight.shape[0], "shards": shards,
                  "evals": evals}))
"""


# Runs with eight CPU devices: the training set-up (`prepare`) of the recipe for (data=2, fsdp=4),
# its model's build recorded; prints whether the build ran inside the sharded program (its arrays
# were tracers), the largest difference from an eager build's weights, and whether the two are
# placed alike.
_BUILD_ON_EIGHT_DEVICES = """
import json, sys
import equinox as eqx, jax, numpy as np
import gptzoo
from gptzoo.recipe import Recipe
from gptzoo.trainer.prepared import prepare
from gptzoo.trainer.sharding import shard

recipe = gptzoo.load_recipe(sys.argv[1], {**json.loads(sys.argv[2]), "mesh.data": 2,
                                          "mesh.fsdp": 4})
build, traced = Recipe.build, []

def recorded(self, *args, **kwargs):
    model = build(self, *args, **kwargs)
    arrays = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    traced.append(all(isinstance(a, jax.core.Tracer) for a in arrays))
    return model

Recipe.build = recorded
p = prepare(recipe, log=lambda *a: None)
key = jax.random.split(jax.random.PRNGKey(recipe.trainer.seed))[0]
eager = shard(build(recipe, p.tokenizer.vocab_size, key=key), p.mesh)
pairs = list(zip(*(jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (p.model, eager))))
print(json.dumps({
    "traced": traced,
    "difference": max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in pairs),
    "placed_alike": all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in pairs)}))
"""


@pytest.mark.dist
def test_a_model_is_built_in_its_shards_on_several_devices():
    """No device holds a whole weight before it is sharded: the build runs inside one program
    constrained to the shardings, and its weights are the eager build's to within rounding."""
    built = subprocess.run([sys.executable, "-c", _BUILD_ON_EIGHT_DEVICES, str(RECIPE),
                            json.dumps(TINY)], capture_output=True, text=True, cwd=ROOT,
                           timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu", **EIGHT_DEVICES})
    assert built.returncode == 0, built.stderr[-3000:]
    found = json.loads(built.stdout.strip().splitlines()[-1])
    assert found["traced"] == [True] and found["placed_alike"]
    assert found["difference"] < 1e-6  # weights of order 0.02; measured 7.5e-9 (rounding)


def _losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records}


def _without_last_checkpoint(run_dir, copy):
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "10")
    return copy


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, small_text):
    """The one-device reference run, every mesh's run (and its shard shapes) on eight devices,
    and both restores across meshes: one device -> eight (FSDP), and eight (FSDP) -> one."""
    root = tmp_path_factory.mktemp("meshes")
    run = {**RUN, "data.path": str(small_text)}
    gptzoo_cli("train", RECIPE, *set_args(run), "--run-dir", root / "one", check=True)
    back = _without_last_checkpoint(root / "one", root / "one_to_eight")
    eight = subprocess.run(
        [sys.executable, "-c", _ON_EIGHT_DEVICES, str(root), json.dumps(run), json.dumps(MESHES),
         str(back), str(RECIPE), json.dumps(EVALUATED)],
        capture_output=True, text=True, cwd=ROOT, timeout=1800,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **EIGHT_DEVICES})
    assert eight.returncode == 0, eight.stderr[-3000:]
    there = _without_last_checkpoint(root / "data2_fsdp4", root / "eight_to_one")
    gptzoo_cli("train", RECIPE, *set_args(run), "--run-dir", there, "--resume", check=True)
    return root, json.loads(eight.stdout.strip().splitlines()[-1])


@pytest.mark.dist
@pytest.mark.parametrize("mesh", MESHES)
def test_each_mesh_logs_the_losses_of_one_device(eight_devices, mesh):
    root, _ = eight_devices
    one, sharded = _losses(root / "one"), _losses(root / mesh)
    assert list(sharded) == list(range(1, 11))
    np.testing.assert_allclose([sharded[s] for s in one], list(one.values()), rtol=1e-5)


def _expected_shards(mesh: str, vocab: int) -> dict[str, tuple[int, ...]]:
    """Each device's piece of the tiny model's weights (d_model 32, 4 heads, MLP 128) as the
    rules split them: embed over fsdp; heads and MLP units over tensor; vocab over tensor only
    when it divides; norms whole; the stacked blocks' leading layer axis whole."""
    _, fsdp, tensor = MESHES[mesh]
    v = vocab // tensor if vocab % tensor == 0 else vocab
    return {
        "token_embedding.weight": (v, 32 // fsdp),
        "position_embedding.weight": (32, 32 // fsdp),
        "blocks.layers.attention.qkv.weight": (1, 32 // fsdp, 96 // tensor),
        "blocks.layers.attention.qkv.bias": (1, 96 // tensor),
        "blocks.layers.attention.out.weight": (1, 32 // tensor, 32 // fsdp),
        "blocks.layers.attention.out.bias": (1, 32 // fsdp),
        "blocks.layers.mlp.up.weight": (1, 32 // fsdp, 128 // tensor),
        "blocks.layers.mlp.down.weight": (1, 128 // tensor, 32 // fsdp),
        "blocks.layers.attn_norm.weight": (1, 32),
        "final_norm.bias": (32,),
        "opt_state.1.0.mu.blocks.layers.attention.qkv.weight": (1, 32 // fsdp, 96 // tensor),
        "opt_state.1.0.nu.blocks.layers.mlp.down.weight": (1, 128 // tensor, 32 // fsdp),
        "opt_state.1.0.count": (),
    }


@pytest.mark.dist
@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_holds_the_shards_the_rules_imply(eight_devices, mesh):
    _, found = eight_devices
    for name, shape in _expected_shards(mesh, found["vocab"]).items():
        assert found["shards"][mesh][name] == [list(shape)] * 8, name


@pytest.mark.dist
def test_a_checkpoint_restores_across_meshes(eight_devices):
    """Step 5 of a one-device run resumed with FSDP over eight devices, and step 5 of an eight-
    device FSDP run resumed on one, each log the steps after it as the unbroken run did."""
    root, _ = eight_devices
    for resumed, unbroken in (("one_to_eight", "one"), ("eight_to_one", "data2_fsdp4")):
        a, b = _losses(root / resumed), _losses(root / unbroken)
        assert list(a) == list(range(1, 11))
        np.testing.assert_allclose([a[s] for s in range(6, 11)], [b[s] for s in range(6, 11)],
                                   rtol=1e-5)


@pytest.mark.dist
@pytest.mark.parametrize("run", EVALUATED)
def test_gptzoo_eval_on_eight_devices_equals_one(eight_devices, run):
    """The same loss whether `gptzoo eval` splits its batches over eight devices or reads them on
    one, where the fsdp2_tensor4 run's own mesh does not fit."""
    root, found = eight_devices
    np.testing.assert_allclose(found["evals"][run], evaluate_run(root / run).loss, rtol=1e-5)


# bf16 compute over float32 master weights, two micro-batches a step, split over fsdp x tensor,
# against one device computing each step in one pass: the loss of every step agrees to within
# what bf16's rounding of differently ordered sums allows, far closer than float32's loss.
BF16_ACCUM = {**RUN, "trainer.precision": "bfloat16", "trainer.grad_accum_steps": "2",
              "optimizer.warmup_steps": "0"}
# Train losses near 4: measured gaps of 4e-5 (against 6e-4 from float32, and 2e-2 when one of
# the two micro-batches is left out of the gradient).
BF16_MESH_TOLERANCE = 2e-4


@pytest.mark.dist
def test_bf16_and_gradient_accumulation_on_fsdp_x_tensor_equal_one_device(tmp_path, small_text):
    run = {**BF16_ACCUM, "data.path": str(small_text)}
    mesh = {"mesh.data": "1", "mesh.fsdp": "2", "mesh.tensor": "4"}
    gptzoo_cli("train", RECIPE, *set_args({**run, **mesh}), "--run-dir", tmp_path / "mesh",
               env=EIGHT_DEVICES, check=True)
    whole_batch = {**run, "trainer.grad_accum_steps": "1"}
    gptzoo.train(gptzoo.load_recipe(RECIPE, whole_batch), run_dir=tmp_path / "one")
    gptzoo.train(gptzoo.load_recipe(RECIPE, {**whole_batch, "trainer.precision": "float32"}),
                 run_dir=tmp_path / "float32")
    sharded, one, float32 = (np.array(list(_losses(tmp_path / name).values()))
                             for name in ("mesh", "one", "float32"))
    assert len(sharded) == 10
    gap = np.abs(sharded - one).max()
    assert gap < BF16_MESH_TOLERANCE
    assert np.abs(sharded - float32).max() > 4 * gap  # bf16 ran on the mesh: float32 is farther
