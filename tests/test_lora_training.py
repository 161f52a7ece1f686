"""LoRA: the component against float64 NumPy and PEFT's initialisation; training only the adapters
(optimizer state, frozen base, checkpoints that name the base, exact resume, accumulation,
bfloat16, eight devices against one)."""

import json
import math
import os
import shutil
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import lora_models
import numpy as np
import pytest
import torch
from conftest import EIGHT_DEVICES, ROOT

from gptzoo.errors import GptzooError
from gptzoo.lora.adapters import adapter_of, add_lora
from gptzoo.lora.run import content_hash
from gptzoo.models import LlamaConfig, build_architecture
from gptzoo.models.names import named_leaves, per_layer_leaves
from gptzoo.nn import Linear
from gptzoo.nn.lora import LoRALinear
from gptzoo.recipe import LoRAConfig, load_recipe
from gptzoo.trainer import load, train
from gptzoo.trainer.checkpoint import Checkpoints, named_arrays
from gptzoo.trainer.prepared import prepare

llama = lora_models.llama  # the shared LoRA fine-tuning, trained once for this module


def test_lora_linear_is_its_base_plus_each_parts_update_in_float64():
    """Three fused parts of widths 6, 4, 4, each with its own rank-3 adapter."""
    rng = np.random.default_rng(0)
    lora = LoRALinear(Linear(8, 14, key=jax.random.PRNGKey(0)), 3, scale=2.5, splits=(6, 4, 4),
                      key=jax.random.PRNGKey(1))
    lora = eqx.tree_at(lambda m: (m.lora_b, m.bias), lora,
                       (jnp.asarray(rng.normal(size=(3, 14)), jnp.float32),
                        jnp.asarray(rng.normal(size=14), jnp.float32)))
    x = rng.normal(size=(5, 8)).astype(np.float32)
    w, b, a, bb = (np.asarray(t, np.float64) for t in (lora.weight, lora.bias, lora.lora_a,
                                                       lora.lora_b))
    expected = x @ w + b
    for j, (start, stop) in enumerate([(0, 6), (6, 10), (10, 14)]):
        expected[:, start:stop] += 2.5 * (x @ a[:, 3 * j:3 * j + 3]) @ bb[:, start:stop]
    np.testing.assert_allclose(lora(jnp.asarray(x)), expected, atol=1e-5)
    np.testing.assert_allclose(lora.merged()(jnp.asarray(x)), expected, atol=1e-5)


def test_adapters_start_as_pefts_and_leave_the_model_unchanged():
    """A as PEFT's default draws it (torch's kaiming-uniform, a = sqrt(5)), B zero: the adapted
    model's logits are the base's exactly; scanned and unscanned layers draw the same adapters."""
    ours = np.asarray(LoRALinear(Linear(256, 8, key=jax.random.PRNGKey(0)), 64, scale=1.0,
                                 key=jax.random.PRNGKey(1)).lora_a)
    theirs = torch.nn.init.kaiming_uniform_(torch.empty(64, 256), a=math.sqrt(5)).numpy()
    assert abs(np.abs(ours).max() / np.abs(theirs).max() - 1) < 0.01
    assert abs(ours.std() / theirs.std() - 1) < 0.03
    config = LlamaConfig(n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, multiple_of=16)
    tokens = jnp.arange(16) % 50
    adapters = []
    for scan in (True, False):
        config.scan_layers = scan
        base = build_architecture("llama", config, 50, key=jax.random.PRNGKey(0))
        model = add_lora(base, LoRAConfig(rank=4), key=jax.random.PRNGKey(1))
        np.testing.assert_array_equal(model(tokens), base(tokens))
        assert all(not np.asarray(b).any() for n, b in named_leaves(model).items()
                   if n.endswith("lora_b"))
        adapters.append({k: np.asarray(v) for k, v in per_layer_leaves(adapter_of(model)).items()})
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 16
    for name in adapters[0]:
        np.testing.assert_array_equal(adapters[0][name], adapters[1][name], name)


def tuned(llama, **changes):
    return load_recipe(llama.base / "recipe.json", {**llama.overrides, **changes})


def adapter_arrays(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in named_arrays(adapter_of(model)).items()}


def test_only_the_adapters_train_and_the_checkpoints_hold_them_and_name_the_base(llama):
    state = named_arrays(prepare(tuned(llama), init_from=llama.base).opt_state)
    adapters = adapter_arrays(llama.result.model)
    assert len(adapters) == 8  # lora_a and lora_b of 4 projections, layers stacked
    for moment in ("mu", "nu"):  # Adam's two moments, of the adapters only
        held = {k.split(f".{moment}.", 1)[1]: v for k, v in state.items() if f".{moment}." in k}
        assert held.keys() == adapters.keys()
        assert sum(v.nbytes for v in held.values()) == sum(a.nbytes for a in adapters.values())
    base, _ = load(llama.base)
    trained = named_arrays(llama.result.model)
    for name, array in named_arrays(base).items():  # frozen, bit for bit
        np.testing.assert_array_equal(trained[name], array, name)
    assert all(np.abs(a).max() > 1e-3 for n, a in adapters.items() if n.endswith("lora_b"))
    checkpoints = Checkpoints(llama.run)
    meta = checkpoints.meta(4)
    checkpoints.close()
    assert set(meta["shapes"]["model"]) == set(adapters)
    assert meta["lora_base"] == {"path": str(llama.base.absolute()), "hash": content_hash(base)}


def test_a_resumed_lora_run_repeats_the_unbroken_one(llama, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llama.run, run)
    shutil.rmtree(run / "checkpoints" / "4")
    resumed = train(tuned(llama), run, resume=True)  # the base is the one its checkpoints name
    expected = adapter_arrays(llama.result.model)
    for name, array in adapter_arrays(resumed.model).items():
        np.testing.assert_array_equal(array, expected[name], name)


def test_a_diverging_lora_run_keeps_the_adapters_that_evaluate_as_well_as_the_run_did(
        llama, tmp_path):
    """Resumed at lr 1e30: step 5's adapters are finite and huge, and the steps after it are
    skipped. The stop evaluates each checkpoint's adapters on the frozen weights: it sets step 5
    aside and keeps step 4, whose loss is the one the run measured there."""
    run = tmp_path / "run"
    shutil.copytree(llama.run, run)
    val_4 = [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").open())
             if r["step"] == 4][0]
    diverging = tuned(llama, **{"trainer.max_steps": "10", "optimizer.lr": "1e30",
                                "trainer.checkpoint_interval": "1", "trainer.max_bad_steps": "2"})
    with pytest.raises(GptzooError) as error:
        train(diverging, run, resume=True)
    message = str(error.value)
    assert f"checkpoint step 4 is kept (validation loss {val_4:.4f} against {val_4:.4f} at " \
           "the step 4 evaluation" in message, message
    assert f"set aside in {run / 'set_aside'}: step 5 (validation loss" in message, message


def losses(run) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").open()]


def test_accumulated_and_bfloat16_lora_steps_agree_with_float32(llama, tmp_path):
    whole = train(tuned(llama, **{"trainer.grad_accum_steps": "1"}), tmp_path / "whole",
                  init_from=llama.base)
    expected = adapter_arrays(llama.result.model)
    for name, array in adapter_arrays(whole.model).items():
        np.testing.assert_allclose(array, expected[name], atol=2e-5, err_msg=name)
    bf16 = tuned(llama, **{"trainer.precision": "bfloat16"})
    half = train(bf16, tmp_path / "bf16", init_from=llama.base)
    np.testing.assert_allclose(losses(tmp_path / "bf16"), losses(llama.run), rtol=0.02)
    assert half.model.blocks.layers.attention.qkv.weight.dtype == jnp.float32
    np.testing.assert_array_equal(half.model.blocks.layers.attention.qkv.weight,
                                  llama.result.model.blocks.layers.attention.qkv.weight)
    # The frozen weights compute in bfloat16 too: the step casts the stacked q/k/v weight.
    p = prepare(bf16, init_from=llama.base)
    step = eqx.filter_make_jaxpr(p.train_chunk)(
        (p.train_batches.chunk(0, 1), p.train_key, np.int32(0)), p.model, p.opt_state)[0]
    assert p.model.blocks.layers.attention.qkv.weight.shape == (2, 32, 64)
    assert "bf16[2,32,64]" in str(step)


# With eight CPU devices: the LoRA fine-tuning on FSDP and FSDP x tensor meshes; prints each
# mesh's adapters and losses as JSON.
_ON_EIGHT_DEVICES = """
import json, sys
from pathlib import Path
import numpy as np
import gptzoo
from gptzoo.lora.adapters import adapter_of
from gptzoo.trainer.checkpoint import named_arrays

base, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
found = {}
for name, (fsdp, tensor) in {"fsdp8": (8, 1), "fsdp4_tensor2": (4, 2)}.items():
    mesh = {"mesh.data": 1, "mesh.fsdp": fsdp, "mesh.tensor": tensor}
    recipe = gptzoo.load_recipe(base / "recipe.json", {**overrides, **mesh})
    model = gptzoo.train(recipe, out / name, init_from=base).model
    found[name] = {k: np.asarray(v).tolist() for k, v in named_arrays(adapter_of(model)).items()}
print(json.dumps(found))
"""


@pytest.mark.dist
def test_lora_on_eight_devices_equals_one(llama, tmp_path):
    overrides = {**llama.overrides, "trainer.batch_size": "8", "trainer.grad_accum_steps": "1"}
    one = train(load_recipe(llama.base / "recipe.json", overrides), tmp_path / "one",
                init_from=llama.base)
    eight = subprocess.run(
        [sys.executable, "-c", _ON_EIGHT_DEVICES, str(llama.base), str(tmp_path),
         json.dumps(overrides)], capture_output=True, text=True, cwd=ROOT, timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **EIGHT_DEVICES})
    assert eight.returncode == 0, eight.stderr[-3000:]
    found = json.loads(eight.stdout.strip().splitlines()[-1])
    for mesh, adapters in found.items():
        for name, array in adapter_arrays(one.model).items():
            # Adam's first steps magnify rounding where a gradient is near zero
            np.testing.assert_allclose(adapters[name], array, atol=1e-4, err_msg=f"{mesh} {name}")
        np.testing.assert_allclose(losses(tmp_path / mesh), losses(tmp_path / "one"), rtol=1e-5)
