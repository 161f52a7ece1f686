"""The zoo's head-QK trick and gpt2's initialisations, against NumPy float64 or their formulas
written out, and the zoo's parts composed into GPTs by recipe files that live outside the package
and trained a few steps."""

import dataclasses
import json
import math
import textwrap

import equinox as eqx
import jax
import numpy as np
import pytest
from conftest import TINY_ONE_EVAL
from zoo_parts_models import X, f64, randomize

import gptzoo
from gptzoo import nn
from gptzoo.models import GPT, gpt2

# Head-QK


def np_head_qk(head, x, tokens, vocab):
    x, tokens = f64(x), np.asarray(tokens)
    q, k = x @ f64(head.q.weight), x @ f64(head.k.weight)
    out = np.zeros((*tokens.shape, vocab))
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1]):
            for j in range(i + 1):
                out[b, i, tokens[b, j]] += q[b, i] @ k[b, j] / q.shape[-1]
    return out


TOKENS = jax.random.randint(jax.random.PRNGKey(10), (2, 6), 0, 5)


def test_head_qk_matches_numpy():
    head = nn.HeadQK(16, 5, d_qk=8, key=jax.random.PRNGKey(11))
    np.testing.assert_array_equal(head(X, TOKENS), 0.0)  # q starts at zero
    head = randomize(head, jax.random.PRNGKey(12))
    np.testing.assert_allclose(head(X, TOKENS), np_head_qk(head, X, TOKENS, 5), rtol=1e-4,
                               atol=1e-5)


def gpt_by_hand(model: GPT, tokens):
    """The final-norm output and head logits, composed from the model's parts."""
    x = model.token_embedding.weight[tokens] + model.position_embedding.weight[: tokens.shape[-1]]
    for block in model.blocks:
        x = block(x)
    x = model.final_norm(x)
    return x, x @ model.token_embedding.weight.T


def small_gpt(**kwargs):
    return gpt2(5, n_layers=2, n_heads=2, d_model=16, block_size=8, key=jax.random.PRNGKey(13),
                **kwargs)


def wide_gpt(n_layers=2, **kwargs):
    """Wide enough for each weight's sample std to lie within a few percent of its init std."""
    return gpt2(65, n_layers=n_layers, n_heads=4, d_model=64, block_size=32, tie_head=False,
                key=jax.random.PRNGKey(16), **kwargs)


def test_gpt_without_head_qk_is_unchanged():
    model = small_gpt()
    assert model.head_qk is None
    np.testing.assert_allclose(model(TOKENS), gpt_by_hand(model, TOKENS)[1], rtol=1e-5, atol=1e-6)


def test_gpt_adds_head_qk_logits_and_stays_causal():
    head = randomize(nn.HeadQK(16, 5, d_qk=8, key=jax.random.PRNGKey(14)), jax.random.PRNGKey(15))
    model = dataclasses.replace(small_gpt(), head_qk=head)
    x, logits = gpt_by_hand(model, TOKENS)
    np.testing.assert_allclose(model(TOKENS), logits + head(x, TOKENS), rtol=1e-5, atol=1e-5)
    assert not np.allclose(model(TOKENS), logits, atol=1e-3)
    np.testing.assert_allclose(model(TOKENS[0]), model(TOKENS)[0], rtol=1e-5, atol=1e-6)
    changed = TOKENS.at[:, 4].set((TOKENS[:, 4] + 1) % 5)
    np.testing.assert_array_equal(model(TOKENS)[:, :4], model(changed)[:, :4])
    assert not np.allclose(model(TOKENS)[:, 4:], model(changed)[:, 4:])


# gpt2's initialisations


def linear_weights(model):
    return {jax.tree_util.keystr(path): f64(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unstacked(model))
            if jax.tree_util.keystr(path).endswith(".weight") and leaf.ndim == 2
            and "embedding" not in jax.tree_util.keystr(path)}


@pytest.mark.parametrize("n_layers", [2, 8])
def test_gpt2_init_is_the_default_and_scales_residual_outputs(n_layers):
    model = wide_gpt(n_layers)  # no `init` given
    weights = linear_weights(model)
    assert len(weights) == 4 * n_layers + 1  # qkv, out, up, down per block, and the head
    for name, w in weights.items():
        residual_output = name.endswith(("out.weight", "down.weight"))
        std = 0.02 / math.sqrt(2 * n_layers) if residual_output else 0.02
        assert abs(w.std() - std) < 0.1 * std, (name, w.std(), std)
    for table in (model.token_embedding.weight, model.position_embedding.weight):
        assert abs(f64(table).std() - 0.02) < 0.1 * 0.02


def test_small_init_has_the_documented_stds():
    model = wide_gpt(init="small")
    std = math.sqrt(2 / (5 * 64))
    weights = linear_weights(model)
    assert len(weights) == 2 * 4 + 1  # qkv, out, up, down per block, and the head
    for name, w in weights.items():
        assert abs(w.std() - std) < 0.1 * std, name
    for table in (model.token_embedding.weight, model.position_embedding.weight):
        assert np.abs(table).max() <= 1e-4
        assert abs(f64(table).std() - 1e-4 / math.sqrt(3)) < 0.1 * 1e-4 / math.sqrt(3)


def test_unknown_init_names_the_choices():
    with pytest.raises(ValueError, match="'gpt2' or 'small'"):
        small_gpt(init="xavier")


# Composed into GPTs by recipes outside the package, and trained


ZOO_RECIPE = '''
import dataclasses

import equinox as eqx
import jax

from gptzoo import nn
from gptzoo.models import GPT
from gptzoo.recipe import ModelConfig


@dataclasses.dataclass
class ZooConfig(ModelConfig):
    norm: str = "rms"  # rms | layer
    mlp: str = "swiglu"  # swiglu | geglu | sgu
    block: str = "parallel"  # parallel (one norm) | parallel2 (two norms) | sequential
    head_qk: bool = False


model = ZooConfig()


def build_model(model, vocab_size, *, key):
    d = model.d_model
    emb_key, pos_key, qk_key, *block_keys = jax.random.split(key, model.n_layers + 3)

    def norm():
        return nn.RMSNorm(d) if model.norm == "rms" else nn.LayerNorm(d)

    def mlp(k):
        if model.mlp == "sgu":
            return nn.SGUMLP(d, model.block_size, key=k)
        act = {"swiglu": "silu", "geglu": "gelu"}[model.mlp]
        return nn.GLUMLP(d, activation=act, multiple_of=32, key=k)

    def block(k):
        attn_key, mlp_key = jax.random.split(k)
        attention = nn.CausalSelfAttention(d, model.n_heads, key=attn_key)
        if model.block == "sequential":
            return nn.Block(attn_norm=norm(), attention=attention, mlp_norm=norm(),
                            mlp=mlp(mlp_key))
        return nn.ParallelBlock(attn_norm=norm(), attention=attention, mlp=mlp(mlp_key),
                                mlp_norm=norm() if model.block == "parallel2" else None)

    return GPT(
        token_embedding=nn.Embedding(vocab_size, d, key=emb_key),
        position_embedding=nn.PositionalEmbedding(model.block_size, d, key=pos_key),
        blocks=tuple(block(k) for k in block_keys),
        final_norm=norm(),
        head=None,
        embed_dropout=eqx.nn.Dropout(model.dropout),
        block_size=model.block_size,
        head_qk=nn.HeadQK(d, vocab_size, d_qk=16, key=qk_key) if model.head_qk else None,
    )
'''

INIT_RECIPE = '''
import dataclasses

from gptzoo.models import gpt2
from gptzoo.recipe import ModelConfig


@dataclasses.dataclass
class InitConfig(ModelConfig):
    init: str = "gpt2"


model = InitConfig()


def build_model(model, vocab_size, *, key):
    return gpt2(vocab_size, **vars(model), key=key)
'''



def train_losses(tmp_path, data, source, overrides):
    path = tmp_path / "recipe.py"
    path.write_text(textwrap.dedent(source))
    recipe = gptzoo.load_recipe(path, {**TINY_ONE_EVAL, "optimizer.lr": "3e-3",
                                       "data.path": str(data), **overrides})
    result = gptzoo.train(recipe, run_dir=tmp_path / "run")
    assert np.isfinite(result.val_loss)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    return recipe, result.model, [r["train_loss"] for r in records]


def module_types(tree) -> set[type]:
    found = set()

    def visit(node) -> bool:  # called on every node of the tree, so it sees nested modules too
        if isinstance(node, eqx.Module):
            found.add(type(node))
        return False

    jax.tree.leaves(tree, is_leaf=visit)
    return found


@pytest.mark.parametrize("parts, kinds", [
    ({"model.norm": "rms", "model.mlp": "swiglu", "model.block": "parallel",
      "model.head_qk": "true"}, (nn.RMSNorm, nn.GLUMLP, nn.ParallelBlock, nn.HeadQK)),
    ({"model.norm": "layer", "model.mlp": "geglu", "model.block": "parallel2"},
     (nn.LayerNorm, nn.GLUMLP, nn.ParallelBlock)),
    ({"model.norm": "rms", "model.mlp": "sgu", "model.block": "sequential"},
     (nn.RMSNorm, nn.SGUMLP, nn.Block)),
], ids=["rms-swiglu-gptj-headqk", "layernorm-geglu-neox", "rms-sgu-sequential"])
def test_recipe_composes_zoo_parts_and_trains(tmp_path, small_text, parts, kinds):
    _, model, losses = train_losses(tmp_path, small_text, ZOO_RECIPE, parts)
    assert set(kinds) <= module_types(model)
    assert losses[-1] < losses[0] - 0.3, losses


def test_recipe_trains_with_small_init(tmp_path, small_text):
    recipe, _, losses = train_losses(tmp_path, small_text, INIT_RECIPE, {"model.init": "small"})
    initial = recipe.build(65, key=jax.random.PRNGKey(0))
    assert np.abs(initial.token_embedding.weight).max() <= 1e-4
    assert losses[-1] < losses[0] - 0.3, losses
