"""LoRA on the attention options: a sliding-window, QK-normed attention and the memory-KV and
talking-heads wrappers get adapters on the projections they hold, computed as the same module
with merged weights in float64 NumPy, and `lora.dropout` reaches each adapted projection."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptzoo import nn
from gptzoo.lora.adapters import add_lora
from gptzoo.lora.config import LoRAConfig
from gptzoo.models.names import named_leaves, replace_arrays

D, HEADS, KV_HEADS = 32, 4, 2


def attention_with(option: str):
    """A `{"attention": module}` tree (module paths `attention.qkv`, `attention.attention.qkv`)."""
    windowed = option == "window_qk_norm"
    inner = nn.CausalSelfAttention(D, HEADS, n_kv_heads=KV_HEADS, positional=nn.Rotary(D // HEADS),
                                   window=3 if windowed else None,
                                   qk_norm="head" if windowed else None, key=jax.random.PRNGKey(0))
    module = {"window_qk_norm": lambda: inner,
              "memory": lambda: nn.MemoryKVAttention(inner, 2, key=jax.random.PRNGKey(1)),
              "talking": lambda: nn.TalkingHeadsAttention(inner)}[option]()
    return {"attention": module}


def with_random_updates(model, seed: int):
    """`model` with every `lora_b` drawn (they start at zero, which would hide the adapters)."""
    rng = np.random.default_rng(seed)
    drawn = {name: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype)
             for name, a in named_leaves(model).items() if name.endswith("lora_b")}
    return replace_arrays(model, {**named_leaves(model), **drawn})


def merged_in_float64(plain, adapted, scale: float):
    """`plain` with each adapted projection's weight `W + scale * A B`, multiplied in NumPy."""
    leaves = named_leaves(adapted)
    weights = {}
    for name in leaves:
        if name.endswith(".lora_a"):
            module = name[:-len(".lora_a")]
            a, b, w = (np.asarray(leaves[f"{module}.{leaf}"], np.float64)
                       for leaf in ("lora_a", "lora_b", "weight"))
            weights[f"{module}.weight"] = jnp.asarray(w + scale * a @ b, jnp.float32)
    return replace_arrays(plain, {**named_leaves(plain), **weights})


@pytest.mark.parametrize("option", ["window_qk_norm", "memory", "talking"])
def test_adapters_on_the_attention_options_compute_their_merged_weights_and_drop_out(option):
    plain = attention_with(option)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, D)), jnp.float32)
    settings = LoRAConfig(rank=2, alpha=4.0, dropout=0.5)
    adapted = with_random_updates(add_lora(plain, settings, key=jax.random.PRNGKey(2)), 3)
    assert {n for n in named_leaves(adapted) if n.endswith("lora_a")} == \
        {n.replace(".weight", ".lora_a") for n in named_leaves(plain)
         if n.endswith(("qkv.weight", "out.weight"))}
    expected = merged_in_float64(plain, adapted, settings.scale)["attention"](x)
    np.testing.assert_allclose(adapted["attention"](x), expected, atol=1e-4)
    for target in ("qkv", "out"):  # each projection's adapter draws its own input dropout
        one = add_lora(plain, LoRAConfig(rank=2, dropout=0.5, targets=rf"\.{target}$"),
                       key=jax.random.PRNGKey(2))
        one = with_random_updates(one, 4)["attention"]
        call = eqx.filter_jit(lambda m, k: m(x, key=k))
        first, second = call(one, jax.random.PRNGKey(5)), call(one, jax.random.PRNGKey(6))
        assert not np.allclose(first, second), f"{option}: no dropout on the {target} adapter"
