"""x-transformers' toggles in a model: cached decoding against the full forward where they decode
(memory key/values, talking heads), the cache refused where they cannot (token shift), and a
recipe composing them with `decoder`, trained a few steps."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_ONE_EVAL
from toggle_layers import D, randomized, self_attention

import gptzoo
from gptzoo import nn
from gptzoo.models import decoder

V, BLOCK_SIZE = 13, 16


# In a model: cached decoding where the toggle decodes, the cache refused where it cannot


def toggled_gpt(attention="memory", *, positional="rotary", sandwich=False, shift=False,
                n_layers=2):
    def norm():
        return nn.TokenShift(nn.LayerNorm(D)) if shift else nn.LayerNorm(D)

    def block(key):  # every array is redrawn below
        mem_key, mlp_key = jax.random.split(key)
        inner = self_attention(positional, n_kv_heads=2)
        wrapped = {"memory": lambda: nn.MemoryKVAttention(inner, 2, key=mem_key),
                   "talking": lambda: nn.TalkingHeadsAttention(inner)}[attention]()
        out_norms = {"attn_out_norm": nn.LayerNorm(D), "mlp_out_norm": nn.LayerNorm(D)}
        return nn.Block(attn_norm=norm(), attention=wrapped, mlp_norm=norm(),
                        mlp=nn.MLP(D, activation="relu2", key=mlp_key),
                        **(out_norms if sandwich else {}))

    model = decoder(V, block=block, n_layers=n_layers, d_model=D, block_size=BLOCK_SIZE,
                    final_norm=nn.LayerNorm(D), positions=None, key=jax.random.PRNGKey(11))
    return randomized(model, 12)


forward = eqx.filter_jit(lambda model, tokens: model(tokens))
decode = eqx.filter_jit(lambda model, tokens, positions, cache: model.decode(tokens, positions,
                                                                             cache))


def cached_logits(model, tokens):
    """Logits from `decode`: the first 5 tokens and 3 of padding in one call (as the sampler pads
    prompts), then each other token on its own, overwriting the padding's slots."""
    first = jnp.concatenate([tokens[:5], tokens[:3]])
    logits, cache = decode(model, first, jnp.arange(8), model.init_cache())
    out = [logits[:5]]
    for p in range(5, len(tokens)):
        logits, cache = decode(model, tokens[p:p + 1], jnp.array([p]), cache)
        out.append(logits)
    return jnp.concatenate(out)


@pytest.mark.parametrize("attention, positional", [
    ("memory", "rotary"), ("memory", "alibi"), ("talking", "rotary"), ("talking", "alibi"),
])
def test_cached_decoding_equals_the_full_forward(attention, positional):
    model = toggled_gpt(attention, positional=positional, sandwich=attention == "memory")
    assert model.cacheable and isinstance(model.blocks, nn.Stack)
    tokens = jnp.asarray(np.random.default_rng(13).integers(0, V, BLOCK_SIZE), jnp.int32)
    np.testing.assert_allclose(cached_logits(model, tokens), forward(model, tokens), rtol=1e-4,
                               atol=1e-4)


def test_a_model_with_token_shift_is_not_decoded_from_a_cache():
    model = toggled_gpt(shift=True)
    assert not model.cacheable  # the sampler recomputes the context instead
    tokens = jnp.asarray(np.random.default_rng(14).integers(0, V, (2, BLOCK_SIZE)), jnp.int32)
    changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % V)
    np.testing.assert_array_equal(forward(model, changed)[:, :9], forward(model, tokens)[:, :9])


# Composed by a recipe with `decoder`, and trained


TOGGLES_RECIPE = '''
import dataclasses

import jax

from gptzoo import nn
from gptzoo.models import decoder
from gptzoo.recipe import ModelConfig


@dataclasses.dataclass
class TogglesConfig(ModelConfig):
    attention: str = "memory"  # memory | talking


model = TogglesConfig()


def build_model(model, vocab_size, *, key):
    d = model.d_model

    def block(k):
        attn_key, mem_key, mlp_key = jax.random.split(k, 3)
        attention = nn.CausalSelfAttention(d, model.n_heads,
                                           positional=nn.Rotary(d // model.n_heads), key=attn_key)
        attention = (nn.MemoryKVAttention(attention, 4, key=mem_key)
                     if model.attention == "memory" else nn.TalkingHeadsAttention(attention))
        return nn.Block(attn_norm=nn.TokenShift(nn.LayerNorm(d)), attention=attention,
                        mlp_norm=nn.TokenShift(nn.LayerNorm(d)),
                        mlp=nn.MLP(d, activation="relu2", key=mlp_key),
                        attn_out_norm=nn.LayerNorm(d), mlp_out_norm=nn.LayerNorm(d))

    return decoder(vocab_size, block=block, n_layers=model.n_layers, d_model=d,
                   block_size=model.block_size, final_norm=nn.LayerNorm(d), positions=None,
                   key=key)
'''


@pytest.mark.parametrize("attention", ["memory", "talking"])
def test_recipe_with_every_toggle_trains(tmp_path, small_text, attention):
    path = tmp_path / "toggles.py"
    path.write_text(TOGGLES_RECIPE)
    recipe = gptzoo.load_recipe(path, {**TINY_ONE_EVAL, "optimizer.lr": "3e-3",
                                       "data.path": str(small_text),
                                       "model.attention": attention})
    result = gptzoo.train(recipe, run_dir=tmp_path / "run")
    metrics = (tmp_path / "run" / "metrics.jsonl").open()
    losses = [json.loads(line)["train_loss"] for line in metrics]
    assert losses[-1] < losses[0] - 0.3, losses
    block = result.model.blocks.layers
    wanted = nn.MemoryKVAttention if attention == "memory" else nn.TalkingHeadsAttention
    assert isinstance(block.attention, wanted) and isinstance(block.attn_norm, nn.TokenShift)
    assert block.mlp.activation == "relu2" and block.mlp_out_norm is not None
