"""The recipes in recipes/: each loads, lists the keys all recipes share and trains from a tiny
override of itself; the zoo recipes build the architectures they name; `decoder` rebuilds gpt2
from gpt2's own block; an ALiBi model reads windows longer than it was trained on; and one zoo
recipe goes through `gptzoo train`, `sample` and `eval` as separate processes."""

import json
import math
import re
import subprocess
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import RECIPE, TINY_ONE_EVAL

import gptzoo
from gptzoo import nn
from gptzoo.cli import main
from gptzoo.data import prepare_corpus
from gptzoo.models import decoder, gpt2

ROOT = Path(__file__).resolve().parents[1]
# Full-size GPU recipes would be slow to build here; perceiver_ar has tests of its own.
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.py")
                 if not p.name.endswith("_gpu.py") and p.name != "perceiver_ar_shakespeare.py")
# GPT-2 small's half-million-token batch does not shrink to the tiny override's (test_tune.py
# trains it with overrides of its own).
TRAINED = [p for p in RECIPES if p.stem != "gpt2_124m"]
SHARED_KEYS = {
    "trainer.max_steps", "trainer.batch_size", "trainer.eval_interval", "trainer.eval_steps",
    "trainer.checkpoint_interval", "trainer.seed", "optimizer.lr", "model.n_layers",
    "model.n_heads", "model.d_model", "model.block_size", "model.dropout", "data.path",
}


def recipe_path(name: str) -> Path:
    return ROOT / "recipes" / f"{name}.py"


def tiny_overrides(path: Path, data: Path) -> dict[str, str]:
    gqa = {"model.n_kv_heads": "2"} if "model.n_kv_heads" in gptzoo.load_recipe(path).keys() else {}
    return {**TINY_ONE_EVAL, "model.n_heads": "4", **gqa, "data.path": str(data)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_text):
    """`trained(path)`: the recipe at `path` trained once with the tiny override, shared by the
    tests that need a trained model."""
    runs = {}

    def train(path: Path):
        if path not in runs:
            recipe = gptzoo.load_recipe(path, tiny_overrides(path, small_text))
            run_dir = tmp_path_factory.mktemp(path.stem)
            result = gptzoo.train(recipe, run_dir=run_dir)
            losses = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").open()]
            runs[path] = (recipe, result, losses)
        return runs[path]

    return train


def module_types(tree) -> set[type]:
    found = set()

    def visit(node) -> bool:  # called on every node, so nested modules are seen too
        if isinstance(node, eqx.Module):
            found.add(type(node))
        return False

    jax.tree.leaves(tree, is_leaf=visit)
    return found


def build(name: str, overrides: dict | None = None):
    """The recipe's model at its own size, as shapes only (nothing is allocated)."""
    recipe = gptzoo.load_recipe(recipe_path(name), overrides)
    return recipe, eqx.filter_eval_shape(recipe.build, 65, key=jax.random.PRNGKey(0))


ALL_RECIPES = sorted((ROOT / "recipes").glob("*.py"))


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds_a_tiny_version_of_itself_that_runs(path):
    """Each file in recipes/, the GPU ones included, loads, takes the shrinking overrides, builds
    and runs a forward pass (training it is left to the tests above, or to a GPU)."""
    keys = gptzoo.load_recipe(path).keys()
    # A recipe's own padded vocabulary (gpt2_124m: 50,304) gives way to the tokenizer's 65.
    optional = {"model.n_kv_heads": "2", "model.n_latents": "8", "model.vocab_size": "none"}
    overrides = {"model.n_layers": "1", "model.d_model": "32", "model.n_heads": "4",
                 "model.block_size": "32", **{k: v for k, v in optional.items() if k in keys}}
    recipe = gptzoo.load_recipe(path, overrides)
    model = recipe.build(65, key=jax.random.PRNGKey(0))
    assert len(model.blocks) == 1 and model.block_size == 32
    logits = eqx.filter_jit(model)(jax.numpy.zeros((2, 32), jax.numpy.int32))
    n_predicted = int(overrides.get("model.n_latents", 32))
    assert logits.shape == (2, n_predicted, 65) and bool(jax.numpy.isfinite(logits).all())


def test_the_gpu_recipe_is_nanogpts_shakespeare_char():
    recipe, model = build("char_shakespeare_gpu")
    assert (recipe.model.n_layers, recipe.model.n_heads, recipe.model.d_model,
            recipe.model.block_size, recipe.model.dropout) == (6, 6, 384, 256, 0.2)
    assert len(model.blocks) == 6 and model.blocks[0].attention.qkv.bias is None  # use_bias=False
    assert recipe.optimizer.grad_clip == 1.0


def test_the_zoo_recipes_are_collected():
    names = {p.stem for p in RECIPES}
    assert {"char_shakespeare", "llama_shakespeare", "gptj_shakespeare",
            "alibi_shakespeare"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_lists_the_shared_keys(path):
    result = CliRunner().invoke(main, ["keys", str(path)])
    assert result.exit_code == 0, result.output
    keys = {line.split("=", 1)[0] for line in result.output.splitlines()}
    assert SHARED_KEYS <= keys, SHARED_KEYS - keys


@pytest.mark.parametrize("path", TRAINED, ids=lambda p: p.stem)
def test_recipe_trains_from_a_tiny_override(path, trained):
    recipe, result, losses = trained(path)
    assert len(result.model.blocks) == 1 and result.model.block_size == 32  # overrides reached it
    assert np.isfinite(result.val_loss)
    assert losses[-1] < losses[0] - 0.3, losses


def test_llama_recipe_is_rmsnorm_rotary_swiglu_gqa_without_biases():
    recipe, model = build("llama_shakespeare")
    assert {nn.RMSNorm, nn.GLUMLP, nn.Rotary} <= module_types(model)
    assert nn.LayerNorm not in module_types(model)
    assert model.position_embedding is None and model.head is not None  # untied head
    for block in model.blocks:
        attention = block.attention
        assert attention.n_kv_heads < attention.n_heads == recipe.model.n_heads
        assert attention.positional.fraction == 1 and not attention.positional.interleaved
        assert block.mlp.activation == "silu"
    linears = [m for m in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, nn.Linear))
               if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is None for m in linears)


def test_mistral_recipe_slides_a_window_shorter_than_its_block():
    recipe, model = build("mistral_shakespeare")
    window = recipe.model.sliding_window
    assert window < model.block_size and model.context_window == window
    assert all(block.attention.window == window for block in model.blocks)


def test_qwen3_recipe_norms_queries_and_keys_in_heads_of_their_own_width():
    recipe, model = build("qwen3_shakespeare")
    for block in model.blocks:
        attention = block.attention
        assert attention.n_heads * attention.head_dim != recipe.model.d_model
        assert attention.qk_norm == "head"
        assert attention.q_norm.scale.shape == attention.k_norm.scale.shape == (64,)
    assert model.head is None  # tied, as Qwen3's small models are


def test_gptj_recipe_is_parallel_with_one_norm_and_quarter_interleaved_rotary():
    _, model = build("gptj_shakespeare")
    assert model.position_embedding is None and model.head is not None
    for block in model.blocks:
        assert isinstance(block, nn.ParallelBlock) and block.mlp_norm is None
        assert isinstance(block.attn_norm, nn.LayerNorm) and isinstance(block.mlp, nn.MLP)
        rotary = block.attention.positional
        assert isinstance(rotary, nn.Rotary) and rotary.fraction == 0.25 and rotary.interleaved
        assert rotary.rotary_dim == block.attention.head_dim // 4


def test_alibi_recipe_has_no_learned_positions_and_optional_head_qk():
    _, model = build("alibi_shakespeare")
    assert model.position_embedding is None and model.head_qk is None
    for block in model.blocks:
        assert isinstance(block, nn.Block) and isinstance(block.attention.positional, nn.ALiBi)
    _, model = build("alibi_shakespeare", {"model.head_qk": "true"})
    assert isinstance(model.head_qk, nn.HeadQK)


def test_alibi_model_trained_on_32_evaluates_on_64_token_windows(trained, small_text):
    recipe, result, _ = trained(recipe_path("alibi_shakespeare"))
    assert recipe.model.block_size == 32
    val = prepare_corpus(recipe.data).val
    assert recipe.data.path == str(small_text)
    short = gptzoo.evaluate(result.model, val, 32).loss
    long = gptzoo.evaluate(result.model, val, 64).loss
    assert np.isfinite(long) and long < math.log(65)  # better than uniform guessing
    assert abs(long - short) < 0.2, (short, long)


def gpt2_block(d_model, n_heads, n_layers):
    """gpt2's block factory, written out as gpt2 builds it."""
    out_std = 0.02 / math.sqrt(2 * n_layers)

    def block(k):
        attn_key, mlp_key = jax.random.split(k)
        return nn.Block(
            attn_norm=nn.LayerNorm(d_model),
            attention=nn.CausalSelfAttention(d_model, n_heads, out_init_std=out_std,
                                             key=attn_key),
            mlp_norm=nn.LayerNorm(d_model),
            mlp=nn.MLP(d_model, out_init_std=out_std, key=mlp_key),
        )

    return block


@pytest.mark.parametrize("tie_head", [True, False])
def test_decoder_with_gpt2_blocks_is_gpt2(tie_head):
    key, shape = jax.random.PRNGKey(3), {"n_layers": 2, "d_model": 16, "block_size": 8}
    expected = gpt2(11, n_heads=2, tie_head=tie_head, **shape, key=key)
    got = decoder(11, block=gpt2_block(16, 2, 2), final_norm=nn.LayerNorm(16),
                  positions="learned", tie_head=tie_head, **shape, key=key)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    tokens = jax.random.randint(key, (2, 8), 0, 11)
    np.testing.assert_array_equal(got(tokens), expected(tokens))


def test_decoder_without_positions_and_bad_positions():
    model = decoder(11, block=gpt2_block(16, 2, 1), n_layers=1, d_model=16, block_size=8,
                    final_norm=nn.RMSNorm(16), positions=None, key=jax.random.PRNGKey(0))
    assert model.position_embedding is None and model.head is None
    with pytest.raises(ValueError, match="positions='rotary'.*'learned'.*None"):
        decoder(11, block=gpt2_block(16, 2, 1), n_layers=1, d_model=16, block_size=8,
                final_norm=nn.RMSNorm(16), positions="rotary", key=jax.random.PRNGKey(0))


def test_llama_recipe_through_the_command_line(tmp_path, small_text):
    path, run_dir = recipe_path("llama_shakespeare"), tmp_path / "run"
    overrides = [arg for k, v in tiny_overrides(path, small_text).items()
                 for arg in ("--set", f"{k}={v}")]

    def gptzoo_cli(*args) -> str:
        done = subprocess.run(["gptzoo", *args], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout

    trained = gptzoo_cli("train", str(path), *overrides, "--run-dir", str(run_dir))
    sample = gptzoo_cli("sample", "--ckpt", str(run_dir), "--prompt", "ROMEO:",
                        "--max-new-tokens", "40", "--seed", "1")
    evaluated = gptzoo_cli("eval", "--ckpt", str(run_dir))
    assert sample.startswith("ROMEO:") and len(sample.rstrip("\n")) >= len("ROMEO:") + 30
    train_loss = float(re.search(r"final val loss ([0-9.]+)", trained).group(1))
    eval_loss = float(re.search(r"val loss ([0-9.]+)", evaluated).group(1))
    assert eval_loss == pytest.approx(train_loss, abs=1e-3)  # the run rebuilds the same model


def test_model_scan_layers_false_still_works_with_a_deprecation_notice(capsys):
    default = gptzoo.load_recipe(RECIPE)
    assert default.trainer.unroll_layers and default.model.scan_layers  # one setting: the trainer's
    assert "deprecated" not in capsys.readouterr().err
    recipe = gptzoo.load_recipe(RECIPE, {"model.scan_layers": "false"})
    assert not recipe.model.scan_layers
    assert ("model.scan_layers=false is deprecated and will go; use trainer.unroll_layers=true"
            in capsys.readouterr().err)
