"""Mixed precision (`trainer.precision="bfloat16"`): bfloat16 compute between and inside the
blocks of every zoo recipe, float32 norm statistics and logits, float32 gradients on the master
weights, and a short bf16 training run that stays close to float32."""

import contextlib
import io
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RECIPE, TINY
from jax.ad_checkpoint import print_saved_residuals

import gptzoo
from gptzoo.nn import GLUMLP, MLP, LayerNorm, RMSNorm
from gptzoo.trainer.precision import in_compute_dtype
from gptzoo.trainer.step import loss_fn

ROOT = Path(__file__).resolve().parents[1]
ZOO = ["char_shakespeare", "llama_shakespeare", "gptj_shakespeare", "alibi_shakespeare",
       "perceiver_ar_shakespeare"]
# Measured on CPU: the largest |bf16 - float32| train loss over the run below is 7.7e-4 (losses
# from 4.0 down to 3.2); the tolerance leaves ~13x margin. See docs/precision-and-batches.md.
BF16_LOSS_TOLERANCE = 0.01


def equations(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (jit, scan, custom_jvp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from equations(inner)


class Spy(eqx.Module):
    """A block that records the dtype of what it returns (at trace time)."""

    block: eqx.Module
    seen: list = eqx.field(static=True)

    def __call__(self, x, *, key=None):
        y = self.block(x, key=key)
        self.seen.append(y.dtype)
        return y


@pytest.mark.parametrize("name", ZOO)
def test_a_bf16_forward_computes_in_bf16_and_returns_float32_logits(name):
    path = ROOT / "recipes" / f"{name}.py"
    keys = gptzoo.load_recipe(path).keys()
    # Unrolled blocks, so that each can be wrapped in a Spy.
    optional = {"model.n_kv_heads": "2", "model.n_latents": "8", "model.head_qk": "true",
                "model.scan_layers": "false"}
    recipe = gptzoo.load_recipe(path, {
        "model.n_layers": "2", "model.d_model": "32", "model.n_heads": "4",
        "model.block_size": "32", **{k: v for k, v in optional.items() if k in keys}})
    model = in_compute_dtype(recipe.build(65, key=jax.random.PRNGKey(0)), "bfloat16")
    seen = []
    model = eqx.tree_at(lambda m: m.blocks, model, tuple(Spy(b, seen) for b in model.blocks))
    tokens = jnp.zeros((2, 32), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda: model(tokens))()  # dropout rates stay Python floats
    assert seen == [jnp.bfloat16, jnp.bfloat16]  # activations between blocks
    assert jaxpr.out_avals[0].dtype == jnp.float32  # logits
    # No matmul anywhere was promoted back to float32 (a float32 table or bias would do it). The
    # attention's own products accumulate in float32, and XLA:CPU has no bf16 x bf16 -> f32 dot,
    # so there an operand may be float32 only as the direct upcast of a bfloat16 value.
    eqns = list(equations(jaxpr.jaxpr))
    upcast = {id(e.outvars[0]) for e in eqns if e.primitive.name == "convert_element_type"
              and e.invars[0].aval.dtype == jnp.bfloat16}
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 or id(v) in upcast
                        for e in dots for v in e.invars)


@pytest.mark.parametrize("norm", [LayerNorm(64), RMSNorm(64)], ids=["layernorm", "rmsnorm"])
def test_norms_take_statistics_in_float32_and_return_the_input_dtype(norm):
    x = (3.0 + jax.random.normal(jax.random.PRNGKey(0), (4, 64))).astype(jnp.bfloat16)
    norm = in_compute_dtype(norm, "bfloat16")
    jaxpr = jax.make_jaxpr(norm)(x)
    # Everything is computed in float32; bfloat16 appears only where the result is cast back.
    # (A call such as the norm's jax.checkpoint returns its casts' dtype: its insides count.)
    computed = [e for e in equations(jaxpr.jaxpr)
                if e.primitive.name != "convert_element_type" and "jaxpr" not in e.params]
    assert computed and all(v.aval.dtype == jnp.float32 for e in computed for v in e.outvars)
    assert jaxpr.out_avals[0].dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    centred = x64 - x64.mean(-1, keepdims=True) if isinstance(norm, LayerNorm) else x64
    scale = (centred.var(-1, keepdims=True) if isinstance(norm, LayerNorm)
             else np.square(x64).mean(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(norm(x), np.float64),
                               centred / np.sqrt(scale + norm.eps), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["char_shakespeare", "llama_shakespeare"])  # tied, own head
def test_the_heads_backward_multiplies_in_bf16(name):
    # The loss's float32 cotangent must not promote the head's two backward products to float32
    # matmuls (on an H100 those were 13% of GPT-2 small's step).
    vocab = 97  # a size no other dimension has
    recipe = gptzoo.load_recipe(ROOT / "recipes" / f"{name}.py", {
        "model.n_layers": "1", "model.d_model": "32", "model.n_heads": "2",
        "model.block_size": "16"})
    model = recipe.build(vocab, key=jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, vocab)
    grad = eqx.filter_grad(lambda m: loss_fn(in_compute_dtype(m, "bfloat16"), tokens[:, :-1],
                                             tokens[:, 1:]))
    jaxpr = jax.make_jaxpr(lambda: grad(model))()  # dropout rates stay Python floats
    head = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"
            and any(vocab in v.aval.shape for v in e.invars)]
    assert len(head) == 3  # the logits, and the products for the input's and the weight's grads
    assert all(v.aval.dtype == jnp.bfloat16 for e in head for v in e.invars)
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in head)  # accumulated in float32


def saved_for_backward(module, x) -> list[str]:
    """The residuals autodiff keeps from `module(x)`'s forward for its backward, as
    `jax.ad_checkpoint.print_saved_residuals` names them (e.g. "bf16[4,16,32]")."""
    params, static = eqx.partition(module, eqx.is_array)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(
            lambda p, x: eqx.combine(p, static)(x).astype(jnp.float32).sum(), params, x)
    return [line.split(" ")[0] for line in printed.getvalue().splitlines()]


@pytest.mark.parametrize("module, hidden", [
    (LayerNorm(32), 32), (RMSNorm(32), 32),
    (MLP(32, key=jax.random.PRNGKey(0)), 128),  # the up-projection's output and GELU's
    (GLUMLP(32, hidden_mult=4, key=jax.random.PRNGKey(0)), 256),  # gate, up, and their product
], ids=["layernorm", "rmsnorm", "mlp", "glu"])
def test_norms_and_activations_keep_only_their_inputs_for_the_backward(module, hidden):
    # Recomputed from their inputs, not kept as float32 statistics' intermediates (three
    # activation-sized float32 arrays per norm) or GELU's and SiLU's (four hidden-sized ones).
    x = jnp.ones((4, 16, 32), jnp.bfloat16)
    saved = saved_for_backward(in_compute_dtype(module, "bfloat16"), x)
    assert not any(s.startswith("f32") for s in saved)
    activations = [s for s in saved if s in (f"bf16[4,16,{hidden}]", f"bf16[64,{hidden}]")]
    assert len(activations) == (1 if hidden == 32 else 2 if isinstance(module, MLP) else 3)


def test_gradients_reach_the_float32_master_weights_in_float32():
    recipe = gptzoo.load_recipe(RECIPE, {"model.n_layers": "1", "model.d_model": "32",
                                         "model.n_heads": "2", "model.block_size": "16"})
    model = recipe.build(65, key=jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, 65)
    grads = eqx.filter_grad(lambda m: loss_fn(in_compute_dtype(m, "bfloat16"), tokens[:, :-1],
                                              tokens[:, 1:]))(model)
    reference = eqx.filter_grad(lambda m: loss_fn(m, tokens[:, :-1], tokens[:, 1:]))(model)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, atol=0.05 * float(jnp.abs(r).max()) + 1e-6)


def test_bf16_training_stays_within_tolerance_of_float32(tmp_path, small_text):
    """50 steps of the tiny recipe in each precision: the train losses agree within
    BF16_LOSS_TOLERANCE at every record, and both learn."""
    overrides = {**TINY, "trainer.max_steps": "50", "trainer.log_interval": "10",
                 "trainer.steps_per_call": "10", "trainer.eval_interval": "50",
                 "trainer.checkpoint_interval": "50", "data.path": str(small_text)}
    losses = {}
    for precision in ("float32", "bfloat16"):
        recipe = gptzoo.load_recipe(RECIPE, {**overrides, "trainer.precision": precision})
        gptzoo.train(recipe, run_dir=tmp_path / precision)
        lines = (tmp_path / precision / "metrics.jsonl").read_text().splitlines()
        losses[precision] = np.array([json.loads(line)["train_loss"] for line in lines])
    gap = np.abs(losses["bfloat16"] - losses["float32"])
    print(f"largest bf16 - float32 train loss gap over 50 steps: {gap.max():.5f}")
    assert gap.max() < BF16_LOSS_TOLERANCE
    assert gap.max() > 0  # bf16 really ran
    assert losses["bfloat16"][-1] < losses["bfloat16"][0] - 0.5
