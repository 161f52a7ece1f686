"""`CausalSelfAttention`'s options against transformers' own attention layers, weights copied
from them after moving them away from their init, float32: sliding-window attention against
Mistral's (eager and sdpa, einsum and block paths), QK-norm per head against Qwen3's (with
head_dim != d_model / n_heads) and over the whole projection against OLMo 2's; and cached
decoding with QK-norm against the full forward."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MistralConfig, Olmo2Config, Qwen3Config
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralRotaryEmbedding
from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention, Olmo2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

from gptzoo import nn

D_MODEL, N_HEADS, N_KV_HEADS = 32, 4, 2
decode = eqx.filter_jit(lambda module, x, positions, cache: module.decode(x, positions, cache))
forward = eqx.filter_jit(lambda module, x: module(x))


def perturbed(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight redrawn from N(0, 0.3^2), norm scales from N(1, 0.3^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            noise = 0.3 * torch.randn(p.shape, generator=generator)
            p.copy_(noise + 1 if "norm" in name else noise)
    return layer.eval()


def to_jax(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.detach().numpy())


def copied(theirs: torch.nn.Module, config, **options) -> nn.CausalSelfAttention:
    """Our attention with `theirs`' weights: q, k and v projections fused, `(in, out)` layout."""
    ours = nn.CausalSelfAttention(
        config.hidden_size, config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
        head_dim=theirs.head_dim, positional=nn.Rotary(theirs.head_dim,
                                                       base=config.rope_parameters["rope_theta"]),
        use_bias=False, key=jax.random.PRNGKey(0), **options)
    projections = (theirs.q_proj, theirs.k_proj, theirs.v_proj)
    weights = [jnp.concatenate([to_jax(p.weight).T for p in projections], axis=1),
               to_jax(theirs.o_proj.weight).T]
    ours = eqx.tree_at(lambda a: (a.qkv.weight, a.out.weight), ours, tuple(weights))
    if "qk_norm" in options:
        ours = eqx.tree_at(lambda a: (a.q_norm.scale, a.k_norm.scale), ours,
                           (to_jax(theirs.q_norm.weight), to_jax(theirs.k_norm.weight)))
    return ours


def their_output(theirs, rotary, config, x: np.ndarray, mask_fn) -> np.ndarray:
    hidden = torch.from_numpy(x)
    positions = torch.arange(x.shape[1])[None]
    mask = mask_fn(config, hidden, None, None, position_ids=positions)
    with torch.no_grad():
        out, _ = theirs(hidden, rotary(hidden, positions), mask)
    return out.numpy()


def inputs(seed: int, seq: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, seq, D_MODEL)).astype(np.float32)


@pytest.mark.parametrize("seq", [40, 150], ids=["einsum path", "block path"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_sliding_window_matches_mistral_attention(implementation, seq):
    config = MistralConfig(hidden_size=D_MODEL, num_attention_heads=N_HEADS,
                           num_key_value_heads=N_KV_HEADS, sliding_window=37,
                           attn_implementation=implementation)
    theirs = perturbed(MistralAttention(config, layer_idx=0), seed=1)
    ours = copied(theirs, config, window=37)
    x = inputs(2, seq)
    expected = their_output(theirs, MistralRotaryEmbedding(config), config, x,
                            create_sliding_window_causal_mask)
    np.testing.assert_allclose(forward(ours, jnp.asarray(x)), expected, atol=1e-5, rtol=1e-5)


QK_LAYERS = {  # (config class, attention, rotary, qk_norm)
    "Qwen3, per head": (Qwen3Config, Qwen3Attention, Qwen3RotaryEmbedding, "head"),
    "OLMo 2, whole projection": (Olmo2Config, Olmo2Attention, Olmo2RotaryEmbedding, "projection"),
}


def qk_layer(name: str, head_dim: int):
    config_class, attention_class, rotary_class, qk_norm = QK_LAYERS[name]
    config = config_class(hidden_size=D_MODEL, num_attention_heads=N_HEADS,
                          num_key_value_heads=N_KV_HEADS, head_dim=head_dim, rms_norm_eps=1e-5,
                          attn_implementation="eager")
    theirs = perturbed(attention_class(config, layer_idx=0), seed=3)
    ours = copied(theirs, config, qk_norm=qk_norm, qk_norm_eps=1e-5)
    return theirs, rotary_class(config), config, ours


@pytest.mark.parametrize("seq", [20, 140], ids=["einsum path", "block path"])
@pytest.mark.parametrize("head_dim", [8, 12], ids=["head_dim d/H", "head_dim 12 != d/H"])
@pytest.mark.parametrize("name", QK_LAYERS)
def test_qk_norm_matches_transformers_attention(name, head_dim, seq):
    theirs, rotary, config, ours = qk_layer(name, head_dim)
    assert ours.q_norm.scale.shape == theirs.q_norm.weight.shape
    assert ours.k_norm.scale.shape == theirs.k_norm.weight.shape
    x = inputs(4, seq)
    expected = their_output(theirs, rotary, config, x, create_causal_mask)
    np.testing.assert_allclose(forward(ours, jnp.asarray(x)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", QK_LAYERS)
def test_qk_norm_cached_decoding_equals_full_forward(name):
    _, _, _, ours = qk_layer(name, head_dim=12)
    x = jnp.asarray(inputs(5, 10)[0])
    cache, steps = ours.init_cache(16), []
    for start, stop in [(0, 6), (6, 7), (7, 10)]:
        y, cache = decode(ours, x[start:stop], jnp.arange(start, stop), cache)
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps), forward(ours, x), atol=1e-5)


def test_attention_rejects_an_unknown_qk_norm():
    with pytest.raises(ValueError, match="qk_norm='rms' is not one of None, head, projection"):
        nn.CausalSelfAttention(D_MODEL, N_HEADS, qk_norm="rms", key=jax.random.PRNGKey(0))
