"""The model protocol (`gptzoo.models.protocol`): which models meet `LanguageModel` and
`CachedDecoder`, and the one line each consumer gives for a model that lacks a member."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from conftest import TINY_ONE_EVAL
from jaxtyping import Array, Int

import gptzoo
from gptzoo import nn
from gptzoo.errors import GptzooError
from gptzoo.models import CachedDecoder, LanguageModel, decoder, gpt2, llama, perceiver_ar, require
from gptzoo.models.protocol import can_decode
from gptzoo.sample import generate_tokens

KEY = jax.random.PRNGKey(0)
SIZES = dict(n_layers=1, n_heads=2, d_model=16, block_size=8)


class LogitsOnly(eqx.Module):
    """Tokens to logits and nothing else: no block_size, context_window or n_predicted."""

    table: Array

    def __call__(self, tokens: Int[Array, "*batch seq"], *, key=None):
        return self.table[tokens]


def sgu_model():
    def block(k):
        attn_key, mlp_key = jax.random.split(k)
        return nn.Block(attn_norm=nn.LayerNorm(16),
                        attention=nn.CausalSelfAttention(16, 2, key=attn_key),
                        mlp_norm=nn.LayerNorm(16),
                        mlp=nn.SGUMLP(16, 8, hidden_mult=1, key=mlp_key))
    return decoder(11, block=block, n_layers=1, d_model=16, block_size=8,
                   final_norm=nn.LayerNorm(16), key=KEY)


def test_which_models_meet_which_protocol():
    gpt, rotary = gpt2(11, **SIZES, key=KEY), llama(11, **SIZES, key=KEY)
    perceiver = perceiver_ar(11, **SIZES, n_latents=4, key=KEY)
    assert isinstance(gpt, CachedDecoder) and can_decode(gpt) and not gpt.slides_window
    assert isinstance(rotary, CachedDecoder) and can_decode(rotary) and rotary.slides_window
    assert isinstance(perceiver, LanguageModel) and not isinstance(perceiver, CachedDecoder)
    assert perceiver.n_predicted(8) == 4 and perceiver.n_predicted(3) == 3
    assert perceiver(jnp.zeros(8, jnp.int32)).shape == (4, 11)  # as n_predicted says
    assert gpt.n_predicted(8) == 8 and gpt.context_window == gpt.block_size == 8
    # A spatial gating unit mixes positions: it has decode(), which does not apply.
    sgu = sgu_model()
    assert isinstance(sgu, CachedDecoder) and not sgu.cacheable and not can_decode(sgu)
    assert not isinstance(LogitsOnly(jnp.zeros((11, 11))), LanguageModel)


def test_a_model_without_decode_where_a_cached_decoder_is_needed():
    perceiver = perceiver_ar(11, **SIZES, n_latents=4, key=KEY)
    with pytest.raises(GptzooError) as error:
        require(perceiver, CachedDecoder, "gptzoo serve")
    assert str(error.value) == (
        "model PerceiverAR lacks cacheable, slides_window, init_cache(), decode(); gptzoo serve "
        "needs a CachedDecoder (gptzoo.models.protocol): add them, or build the model with "
        "gptzoo.models.decoder")
    # The sampler's cache path: --context slide slides a KV cache.
    with pytest.raises(GptzooError, match=r"^model PerceiverAR lacks .*decode\(\); --context "
                                          r"slide needs a CachedDecoder .*: use --context shift"):
        next(generate_tokens(perceiver, [[1, 2]], max_new_tokens=2, context="slide"))
    # Without the cache path, it is sampled by recomputing its context.
    assert next(generate_tokens(perceiver, [[1, 2]], max_new_tokens=1)).shape == (1, 1)


def test_a_model_without_block_size_fails_in_one_line_wherever_it_is_used(tmp_path, small_text):
    model = LogitsOnly(jnp.zeros((11, 11)))
    line = (r"^model LogitsOnly lacks block_size, context_window, n_predicted\(\); {} needs a "
            r"LanguageModel \(gptzoo.models.protocol\)")
    with pytest.raises(GptzooError, match=line.format("gptzoo sample")):
        next(generate_tokens(model, [[1, 2]], max_new_tokens=2))
    with pytest.raises(GptzooError, match=line.format(r"evaluate\(\)")):
        gptzoo.evaluate(model, jnp.arange(40) % 11, 8)
    recipe_file = tmp_path / "logits_only.py"
    recipe_file.write_text(
        "import jax.numpy as jnp\nfrom test_protocol import LogitsOnly\n\n"
        "def build_model(model, vocab_size, *, key):\n"
        "    return LogitsOnly(jnp.zeros((vocab_size, vocab_size)))\n")
    recipe = gptzoo.load_recipe(recipe_file, {**TINY_ONE_EVAL, "data.path": str(small_text)})
    with pytest.raises(GptzooError, match=line.format(r"gptzoo train \(logits_only.py\)")):
        gptzoo.train(recipe, run_dir=tmp_path / "run")
