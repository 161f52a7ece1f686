"""Model families (`gptzoo.models.registry`): a family registered from outside the package (the
add-a-family guide's) trains, exports and imports through the generic code; the registry refuses
clashes; run directories written before families had modules still load."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY_ONE_EVAL
from test_docs_examples import doc_recipes

import gptzoo
from gptzoo.errors import GptzooError
from gptzoo.hf import export_hf, import_hf
from gptzoo.models import (
    CachedDecoder,
    Family,
    GPT2Config,
    LlamaConfig,
    PerceiverAR,
    get_family,
    register,
)
from gptzoo.models.axes import logical_axes
from gptzoo.models.names import per_layer_leaves
from gptzoo.recipe import load_recipe, load_run_recipe


@pytest.fixture
def layerscale(family_registry, monkeypatch):
    """The guide's `layerscale.py` imported as a module of its own, which registers its family
    (for this test only)."""
    module = types.ModuleType("layerscale_family")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # its dataclass looks it up
    exec(compile(doc_recipes()["layerscale.py"], "layerscale.py", "exec"), module.__dict__)
    return module


def test_a_family_registered_outside_the_package_trains_exports_and_imports(
        layerscale, tmp_path, small_text):
    recipe_file = tmp_path / "layerscale_recipe.py"
    recipe_file.write_text("from gptzoo.recipe import DataConfig\n\narchitecture = 'layerscale'\n"
                           "data = DataConfig(tokenizer='bpe', vocab_size=300)\n")
    steps = {"trainer.max_steps": "10", "trainer.eval_interval": "10",
             "trainer.checkpoint_interval": "10"}
    recipe = load_recipe(recipe_file, {**TINY_ONE_EVAL, **steps, "data.path": str(small_text),
                                       "model.n_heads": "2", "model.init_scale": "0.5"})
    assert isinstance(recipe.model, layerscale.LayerScaleConfig)
    result = gptzoo.train(recipe, run_dir=tmp_path / "run")
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "run/metrics.jsonl").open()]
    assert np.isfinite(result.val_loss) and losses[-1] < losses[0]
    assert isinstance(result.model, CachedDecoder) and result.model.cacheable
    # The family's own logical axes reach the sharding rules.
    assert logical_axes("blocks.layers.attn_scale", 2) == ("layers", "norm")

    # Rebuilt from recipe.json alone, then out to a HF folder and back in: nothing changes.
    export_hf(tmp_path / "run", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LayerScaleForCausalLM"] and config["head_dim"] == 16
    import_hf(tmp_path / "hf", tmp_path / "imported")
    assert load_run_recipe(tmp_path / "imported").architecture == "layerscale"
    trained, _ = gptzoo.load(tmp_path / "run")
    imported, _ = gptzoo.load(tmp_path / "imported")
    first, second = per_layer_leaves(trained), per_layer_leaves(imported)
    assert first.keys() == second.keys() and "blocks.0.mlp_scale" in first
    for name in first:
        np.testing.assert_array_equal(np.asarray(first[name]), np.asarray(second[name]), name)
    assert not np.allclose(first["blocks.0.mlp_scale"], 0.5)  # trained away from its init


def test_the_guides_module_loads_where_the_guide_puts_it(tmp_path):
    """In a copy of the package, as `gptzoo/models/families/layerscale.py` with its import line
    in the families' `__init__.py`: gptzoo still imports, and the family's keys are listed."""
    shutil.copytree(ROOT / "gptzoo", tmp_path / "gptzoo",
                    ignore=shutil.ignore_patterns("__pycache__"))
    families = tmp_path / "gptzoo" / "models" / "families"
    (families / "layerscale.py").write_text(doc_recipes()["layerscale.py"])
    init = families / "__init__.py"
    init.write_text(init.read_text() + "from gptzoo.models.families import layerscale\n")
    recipe = tmp_path / "layerscale_recipe.py"
    recipe.write_text("architecture = 'layerscale'\n")
    result = subprocess.run([sys.executable, "-m", "gptzoo", "keys", str(recipe)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "model.init_scale=" in result.stdout and "model.head_dim=None" in result.stdout


def test_the_registry_refuses_a_second_family_of_a_name_or_class(layerscale):
    family = layerscale.FAMILY
    with pytest.raises(ValueError, match="named 'llama' is already registered"):
        register(Family(name="llama", config=family.config, build=family.build))
    stealing = Family(name="thief", config=family.config, build=family.build,
                      hf=dataclasses.replace(family.hf, classes=("LlamaForCausalLM",)))
    with pytest.raises(ValueError, match="LlamaForCausalLM is already read by the llama family"):
        register(stealing)
    assert register(family) is family  # registering the same family again changes nothing
    with pytest.raises(KeyError, match="no model family 'nope'; registered: gpt2, llama"):
        get_family("nope")


def test_derived_sizes_are_worked_out_in_the_config():
    config = LlamaConfig(d_model=96, n_heads=4, multiple_of=32, use_bias=True)
    resolved = config.resolved()
    assert (resolved.head_dim, resolved.n_kv_heads, resolved.d_hidden, resolved.qkv_bias) == (
        24, 4, 256, True)  # 2/3 of 4 x 96 = 256, a multiple of 32
    assert config.head_dim is None  # the recipe keeps its default, to follow d_model
    model = get_family("llama").build(resolved, 50, key=jax.random.PRNGKey(0))
    assert model.blocks[0].mlp.gate_up.weight.shape == (96, 2 * 256)


# The model sections that recipe.json held before families had modules (field for field).
OLD_MODELS = {
    "gpt2": {"n_layers": 1, "n_heads": 2, "d_model": 16, "block_size": 8, "dropout": 0.0,
             "use_bias": True, "tie_head": True, "norm_eps": 1e-05, "approximate_gelu": True,
             "init": "gpt2", "scan_layers": True, "vocab_size": None},
    "llama": {"n_layers": 1, "n_heads": 2, "d_model": 16, "block_size": 8, "dropout": 0.0,
              "use_bias": False, "tie_head": False, "n_kv_heads": 1, "head_dim": None,
              "d_hidden": None, "multiple_of": 16, "rotary_base": 10000.0, "rope_scaling": None,
              "norm_eps": 1e-06, "qkv_bias": None, "scan_layers": True, "vocab_size": None},
}


@pytest.mark.parametrize("architecture", OLD_MODELS)
def test_recipe_json_of_earlier_runs_still_loads(architecture, tmp_path):
    old = {"name": "old", "architecture": architecture, "model": OLD_MODELS[architecture],
           "data": {}, "optimizer": {}, "trainer": {}, "mesh": {}}
    (tmp_path / "recipe.json").write_text(json.dumps(old))
    recipe = load_run_recipe(tmp_path)
    assert isinstance(recipe.model, (GPT2Config if architecture == "gpt2" else LlamaConfig))
    # A resume compares these, a key one side lacks as None: fields added since are None.
    model = recipe.to_dict()["model"]
    assert {k: v for k, v in model.items()
            if v is not None or k in OLD_MODELS[architecture]} == OLD_MODELS[architecture]
    model = recipe.build(11, key=jax.random.PRNGKey(0))
    assert model(jnp.zeros(8, jnp.int32)).shape == (8, 11)


def test_a_recipe_extending_model_config_still_builds(tmp_path):
    """The Perceiver AR recipe as it was, with its own config and build_model: its runs keep
    their recipe.py, which must still run."""
    (tmp_path / "old_perceiver.py").write_text(
        "import dataclasses\n\nfrom gptzoo.models import perceiver_ar\n"
        "from gptzoo.recipe import ModelConfig\n\n\n@dataclasses.dataclass\n"
        "class PerceiverARConfig(ModelConfig):\n    n_latents: int = 128\n\n\n"
        "model = PerceiverARConfig(n_layers=1, n_heads=2, d_model=16, block_size=8, "
        "n_latents=4)\n\n\ndef build_model(model, vocab_size, *, key):\n"
        "    return perceiver_ar(vocab_size, **vars(model), key=key)\n")
    model = load_recipe(tmp_path / "old_perceiver.py").build(11, key=jax.random.PRNGKey(0))
    assert isinstance(model, PerceiverAR) and model(jnp.zeros(8, jnp.int32)).shape == (4, 11)


def test_an_unknown_architecture_fails_naming_the_registered_ones(tmp_path):
    (tmp_path / "r.py").write_text("architecture = 'mamba'\n")
    with pytest.raises(GptzooError, match="architecture='mamba' is not built in; choose one of "
                                          "gpt2, llama, mixtral, perceiver_ar"):
        load_recipe(tmp_path / "r.py")
