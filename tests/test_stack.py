"""Scan over layers and rematerialisation: a `Stack` computes what the tuple of its blocks does
(parameters, logits, dropout, losses in training, the KV-cached decode), neither remat nor
unrolling changes a gradient, and weights move between the two layouts by name."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RECIPE, TINY, gptzoo_cli, set_args

import gptzoo
from gptzoo.models import gpt2, llama
from gptzoo.models.names import named_leaves, per_layer_leaves
from gptzoo.nn import Stack, unstacked, with_scan_settings
from gptzoo.recipe import OptimizerConfig
from gptzoo.trainer.checkpoint import Checkpoints
from gptzoo.trainer.init_from import Initial
from gptzoo.trainer.loop import prepare
from gptzoo.trainer.optimizer import make_optimizer
from gptzoo.trainer.run_dir import load
from gptzoo.trainer.step import loss_fn

KEY = jax.random.PRNGKey(0)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 65)


def small_gpt2(scan_layers: bool, dropout: float = 0.0):
    return gpt2(65, n_layers=3, n_heads=2, d_model=32, block_size=16, dropout=dropout,
                scan_layers=scan_layers, key=KEY)


def assert_same(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def test_scanned_model_has_the_unrolled_parameters_stacked_and_computes_the_same():
    scanned, unrolled = small_gpt2(True, dropout=0.2), small_gpt2(False, dropout=0.2)
    assert isinstance(scanned.blocks, Stack) and isinstance(unrolled.blocks, tuple)
    names = named_leaves(scanned)
    assert names["blocks.layers.attention.qkv.weight"].shape == (3, 32, 96)
    assert "blocks.0.attention.qkv.weight" in named_leaves(unrolled)
    assert_same(per_layer_leaves(scanned), named_leaves(unrolled))  # same keys, same weights
    forward = eqx.filter_jit(lambda model, key: model(TOKENS, key=key))
    np.testing.assert_allclose(forward(scanned, None), forward(unrolled, None), atol=1e-6)
    dropped = forward(scanned, KEY)  # each layer's dropout key as the unrolled loop draws it
    assert not np.allclose(dropped, forward(scanned, None))
    np.testing.assert_allclose(dropped, forward(unrolled, KEY), atol=1e-6)


def test_blocks_that_differ_stay_a_tuple():
    a, b = small_gpt2(False).blocks[:2]
    wider = gpt2(65, n_layers=1, n_heads=2, d_model=64, block_size=16, key=KEY).blocks[0]
    assert Stack.from_blocks([a, b]) is not None
    assert Stack.from_blocks([a, wider]) is None
    more_dropout = eqx.tree_at(lambda m: m.attention.resid_dropout.p, b, 0.5)
    assert Stack.from_blocks([a, more_dropout]) is None


def test_weight_decay_skips_stacked_norms_and_biases():
    model = small_gpt2(True)
    params = eqx.filter(model, eqx.is_array)
    optimizer = make_optimizer(OptimizerConfig(warmup_steps=0, weight_decay=0.5), 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    layers = updates.blocks.layers  # with no gradient, only weight decay moves a parameter
    assert jnp.all(layers.attention.qkv.weight != 0) and jnp.all(layers.mlp.up.weight != 0)
    assert not jnp.any(layers.attention.qkv.bias) and not jnp.any(layers.attn_norm.weight)


def test_kv_cached_decode_of_a_stacked_model_matches_its_forward():
    model = llama(65, n_layers=3, n_heads=4, n_kv_heads=2, d_model=32, block_size=16,
                  multiple_of=16, key=KEY)
    assert isinstance(model.blocks, Stack) and model.cacheable
    tokens = TOKENS[0]
    cache = model.init_cache()
    assert cache.k.shape[0] == 3  # one cache, a leading layer axis
    decode = eqx.filter_jit(lambda m, t, p, c: m.decode(t, p, c))
    logits, cache = decode(model, tokens[:9], jnp.arange(9), cache)  # prefill
    steps = [logits]
    for p in range(9, 16):
        logits, cache = decode(model, tokens[p:p + 1], jnp.array([p]), cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps), eqx.filter_jit(model)(tokens), atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_the_same_gradients(remat):
    model = small_gpt2(True, dropout=0.1)
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]

    @eqx.filter_jit
    def grads(m):
        return eqx.filter_grad(lambda m: loss_fn(m, inputs, targets, KEY))(m)

    rematted = with_scan_settings(model, remat)
    assert rematted.blocks.remat == remat
    # The backward pass really recomputes: a remat (jax.checkpoint) of the block appears in the
    # program, beside those of the norms and activations (which always recompute).
    def remats(m):
        return str(eqx.filter_make_jaxpr(lambda m: loss_fn(m, inputs, targets, KEY))(m)[0]
                   ).count("remat")

    assert remats(rematted) > remats(model)
    assert_same(named_leaves(grads(rematted)), named_leaves(grads(model)), atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "dots_with_no_batch_dims_saveable"])
def test_an_unrolled_stack_writes_out_its_layers_and_gives_the_same_gradients(remat):
    model = with_scan_settings(small_gpt2(True, dropout=0.1), remat)
    unrolled = with_scan_settings(model, remat, unroll=True)
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: loss_fn(m, inputs, targets, KEY)))

    def loops(m):  # in the step as XLA receives it (dropout's random bits bring loops of their own)
        return grads.lower(m).as_text().count("stablehlo.while")

    assert loops(model) == loops(unrolled) + 2  # the forward's and the backward's over the layers
    assert_same(named_leaves(grads(unrolled)), named_leaves(grads(model)), atol=1e-6)


def test_the_trainer_builds_its_stacks_with_the_recipes_scan_settings(small_text):
    settings = {"model.scan_layers": "true", "trainer.remat": "full",
                "trainer.unroll_layers": "true"}
    recipe = gptzoo.load_recipe(RECIPE, {**TINY, "data.path": str(small_text), **settings})
    blocks = prepare(recipe, log=lambda _: None).model.blocks
    assert (blocks.remat, blocks.unroll) == ("full", True)


def test_bad_remat_is_a_one_line_error():
    with pytest.raises(ValueError, match="choose one of none, full, .*dots_saveable"):
        with_scan_settings(small_gpt2(True), "everything")
    with pytest.raises(ValueError, match="scan_layers"):
        with_scan_settings(small_gpt2(False), "full")
    result = gptzoo_cli("train", RECIPE, *set_args({**TINY, "trainer.remat": "bogus"}))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: trainer.remat='bogus' must be one of "
                                                   "none, full, ")
    assert "dots_with_no_batch_dims_saveable" in lines[0]


def train_tiny(small_text, run_dir, scan_layers: bool):
    overrides = {**TINY, "data.path": str(small_text), "model.n_layers": "2",
                 "model.dropout": "0.1", "trainer.max_steps": "20",
                 "model.scan_layers": str(scan_layers)}
    gptzoo.train(gptzoo.load_recipe(RECIPE, overrides), run_dir=run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory, small_text):
    runs = tmp_path_factory.mktemp("scan_runs")
    losses = {scan: train_tiny(small_text, runs / str(scan), scan) for scan in (True, False)}
    return runs, losses


def test_scanned_training_logs_the_unrolled_losses(both_runs):
    _, losses = both_runs
    assert len(losses[True]) == 4
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def restored(recipe, run_dir, vocab_size: int):
    """`run_dir`'s last checkpoint restored into `recipe`'s model and a fresh optimizer state."""
    model = recipe.build(vocab_size, key=KEY)
    opt_state = make_optimizer(recipe.optimizer, 20).init(eqx.filter(model, eqx.is_array))
    checkpoints = Checkpoints(run_dir)
    model, opt_state = checkpoints.restore(20, model, opt_state)
    checkpoints.close()
    return model, opt_state


def test_checkpoints_and_init_from_cross_layouts(both_runs):
    runs, _ = both_runs
    recipes = {s: gptzoo.load_recipe(runs / str(s) / "recipe.json") for s in (True, False)}
    vocab_size = load(runs / "True")[1].vocab_size
    # A run's checkpoint restores, optimizer state included, into a model of the other layout
    # (an unrolled run's into a stacked model, e.g. a run from before scan_layers) and back.
    for scan in (True, False):
        native = restored(recipes[scan], runs / str(scan), vocab_size)
        crossed = restored(recipes[not scan], runs / str(scan), vocab_size)
        assert isinstance(crossed[0].blocks, Stack) is (not scan)
        assert_same(per_layer_leaves(crossed), per_layer_leaves(native))
    # --init-from takes an unrolled run's weights into a stacked model.
    initial = Initial.load(runs / "False")
    model = initial.weights_into(recipes[True].build(vocab_size, key=KEY))
    assert isinstance(model.blocks, Stack) and isinstance(initial.model.blocks, tuple)
    assert_same(named_leaves(unstacked(model)), named_leaves(initial.model))
