"""The foundation's components against independent references."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from gptzoo.models import gpt2
from gptzoo.nn import CausalSelfAttention, LayerNorm
from gptzoo.nn._typecheck import ShapeError


def naive_attention(x, w_qkv, b_qkv, w_out, b_out, n_heads):
    """Causal multi-head attention in float64 NumPy, one head and one query at a time."""
    x, w_qkv, b_qkv, w_out, b_out = (np.asarray(a, np.float64)
                                     for a in (x, w_qkv, b_qkv, w_out, b_out))
    seq, d_model = x.shape
    head_dim = d_model // n_heads
    q, k, v = np.split(x @ w_qkv + b_qkv, 3, axis=-1)
    out = np.zeros((seq, d_model))
    for h in range(n_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        for i in range(seq):
            scores = np.array([q[i, cols] @ k[j, cols] for j in range(i + 1)]) / np.sqrt(head_dim)
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[i, cols] = sum(w * v[j, cols] for j, w in enumerate(weights))
    return out @ w_out + b_out


def test_attention_matches_float64_reference():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    attention = CausalSelfAttention(24, 3, key=keys[0])
    # Non-zero biases so the reference checks them too.
    attention = eqx.tree_at(lambda a: (a.qkv.bias, a.out.bias), attention,
                            (0.1 * jax.random.normal(keys[1], (72,)),
                             0.1 * jax.random.normal(keys[2], (24,))))
    x = jax.random.normal(keys[3], (2, 7, 24))
    got = np.asarray(attention(x))
    for row in range(2):
        want = naive_attention(x[row], attention.qkv.weight, attention.qkv.bias,
                               attention.out.weight, attention.out.bias, n_heads=3)
        np.testing.assert_allclose(got[row], want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(attention(x[0])), got[0], atol=1e-6)


def small_gpt(**kwargs):
    config = dict(n_layers=2, n_heads=2, d_model=16, block_size=12)
    return gpt2(11, **{**config, **kwargs}, key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("t", [0, 5, 11])
def test_changing_a_token_never_changes_earlier_logits(t):
    model = small_gpt()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (12,), 0, 11)
    changed = tokens.at[t].set((tokens[t] + 1) % 11)
    before, after = model(tokens), model(changed)
    np.testing.assert_array_equal(before[:t], after[:t])
    assert not np.allclose(before[t:], after[t:])


def first_line(error: pytest.ExceptionInfo) -> str:
    return str(error.value).splitlines()[0]


def test_wrong_shapes_fail_naming_the_dimension_and_sizes():
    model = small_gpt()
    with pytest.raises(TypeCheckError) as error:  # ShapeError is one, for existing `except`s
        LayerNorm(16)(jnp.ones((3, 15)))
    assert first_line(error) == (
        "weight float32[16] against Float[Array, 'd_model']: the size of dimension d_model is 16 "
        "which does not equal the existing value of 15, bound by x float32[3, 15] (in layer_norm)")
    with pytest.raises(ShapeError) as error:  # the input's width meets the first projection
        eqx.filter_jit(CausalSelfAttention(16, 2, key=jax.random.PRNGKey(0)))(jnp.ones((3, 15)))
    assert first_line(error).startswith(
        "weight float32[16, 48] against Float[Array, 'd_in d_out']: the size of dimension d_in is "
        "16 which does not equal the existing value of 15, bound by x float32[3, 15] (in affine)")
    with pytest.raises(ShapeError) as error:
        model(jnp.zeros((2, 3, 4), jnp.float32))  # floats, not token ids
    assert first_line(error).startswith(
        "tokens float32[2, 3, 4] against Int[Array, '*batch seq']: this array has dtype float32")
    assert first_line(error).endswith("(in GPT.__call__)")
    with pytest.raises(ValueError, match="block_size=12"):
        model(jnp.zeros(13, jnp.int32))


def test_layernorm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    norm = eqx.tree_at(lambda n: (n.weight, n.bias), LayerNorm(16),
                       (jnp.linspace(0.5, 1.5, 16), jnp.linspace(-1, 1, 16)))
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    want = want * np.linspace(0.5, 1.5, 16) + np.linspace(-1, 1, 16)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, atol=1e-5)


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="d_model=16 is not divisible by n_heads=3"):
        small_gpt(n_heads=3)


def test_tied_head_shares_the_embedding():
    count = lambda m: sum(a.size for a in jax.tree.leaves(eqx.filter(m, eqx.is_array)))  # noqa: E731
    assert count(small_gpt(tie_head=False)) - count(small_gpt()) == 11 * 16


def test_a_batch_equals_its_examples():
    model = small_gpt()
    tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 12), 0, 11)
    batched = model(tokens)
    for row in range(3):
        np.testing.assert_allclose(batched[row], model(tokens[row]), atol=1e-6)
