"""Tiny models and sampling helpers shared by the generation tests (test_generation.py,
test_generation_batches.py, test_sampling_rules.py, test_generation_cache.py): GPTs of random
weights for every architecture of the zoo (`ARCHS`, one-layer and untied-head ones, `build` caching
each), `generate` collecting the sampler's tokens, a jitted full `forward`, and the greedy loops
written here by full forwards (nanoGPT's cropping, llama.cpp's context shift) that cached sampling
is checked against."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gptzoo import nn
from gptzoo.models import GPT, gpt2
from gptzoo.sample import generate_tokens

V, D_MODEL, N_HEADS, BLOCK_SIZE = 29, 32, 4, 16
HEAD_DIM = D_MODEL // N_HEADS
N_NEW = 40  # past block_size: prompts of 5 tokens end at position 44, almost 3 windows


def randomize(model, seed, scale=0.5):
    """Every array redrawn from N(0, scale^2) (NumPy's draws: each new shape jax.random compiles
    costs ~1 s), so attention, biases and norm scales all move the logits."""
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype) for a in leaves]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def compose(positional=None, *, n_kv_heads=None, learned=False, parallel=None, llama=False,
            mlp=None, head_qk=False, n_layers=2, seed=0) -> GPT:
    """A GPT assembled by hand from the zoo's parts, with random weights."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * n_layers + 3)

    def norm():
        return nn.RMSNorm(D_MODEL) if llama else nn.LayerNorm(D_MODEL)

    def block(attn_key, mlp_key):
        attention = nn.CausalSelfAttention(D_MODEL, N_HEADS, n_kv_heads=n_kv_heads,
                                           positional=positional, key=attn_key)
        if mlp is not None:
            ff = mlp(mlp_key)
        elif llama:
            ff = nn.GLUMLP(D_MODEL, multiple_of=16, key=mlp_key)
        else:
            ff = nn.MLP(D_MODEL, key=mlp_key)
        if parallel == "gpt-j":
            return nn.ParallelBlock(attn_norm=norm(), attention=attention, mlp=ff)
        if parallel == "neox":
            return nn.ParallelBlock(attn_norm=norm(), attention=attention, mlp=ff,
                                    mlp_norm=norm())
        return nn.Block(attn_norm=norm(), attention=attention, mlp_norm=norm(), mlp=ff)

    model = GPT(
        token_embedding=nn.Embedding(V, D_MODEL, key=keys[-1]),
        position_embedding=(nn.PositionalEmbedding(BLOCK_SIZE, D_MODEL, key=keys[-2])
                            if learned else None),
        blocks=tuple(block(keys[2 * i], keys[2 * i + 1]) for i in range(n_layers)),
        final_norm=norm(),
        head=None,
        embed_dropout=eqx.nn.Dropout(0.0),
        block_size=BLOCK_SIZE,
        head_qk=nn.HeadQK(D_MODEL, V, d_qk=16, key=keys[-3]) if head_qk else None,
    )
    return randomize(model, seed + 1)


# Each part of the zoo in at least one model: learned positions (GPT-2), rotary full and partial,
# interleaved (GPT-J) and not (NeoX, LLaMA), ALiBi, GQA and MQA, parallel blocks with one norm
# (GPT-J) and two (NeoX), RMSNorm + SwiGLU (LLaMA).
ARCHS = {
    "gpt2": lambda: randomize(gpt2(V, n_layers=2, n_heads=N_HEADS, d_model=D_MODEL,
                                   block_size=BLOCK_SIZE, key=jax.random.PRNGKey(0)), 1),
    "llama": lambda: compose(nn.Rotary(HEAD_DIM), n_kv_heads=2, llama=True),
    "gpt-j": lambda: compose(nn.Rotary(HEAD_DIM, fraction=0.5, interleaved=True),
                             parallel="gpt-j"),
    "neox": lambda: compose(nn.Rotary(HEAD_DIM, fraction=0.25), parallel="neox"),
    "alibi-mqa": lambda: compose(nn.ALiBi(N_HEADS), n_kv_heads=1),
}


# One layer: a cached key depends only on its own token (and relative position), so sliding the
# cache past block_size is the same as recomputing the last block_size tokens.
ONE_LAYER = {
    "rotary-1-layer": lambda: compose(nn.Rotary(HEAD_DIM), n_layers=1),
    "alibi-1-layer": lambda: compose(nn.ALiBi(N_HEADS), n_layers=1),
}


# An output head of its own (a Linear) rather than tied to the token embedding.
UNTIED = {"gpt2-untied-head": lambda: randomize(gpt2(
    V, n_layers=1, n_heads=N_HEADS, d_model=D_MODEL, block_size=BLOCK_SIZE, tie_head=False,
    key=jax.random.PRNGKey(0)), 4)}


@functools.cache
def build(name: str) -> GPT:
    return {**ARCHS, **ONE_LAYER, **UNTIED}[name]()


def generate(model, prompts, n=N_NEW, **kwargs) -> np.ndarray:
    return np.concatenate(list(generate_tokens(model, prompts, max_new_tokens=n, **kwargs)), 1)


PROMPT = np.array([3, 1, 4, 1, 5])
forward = eqx.filter_jit(lambda model, tokens: model(tokens))


def last_logits(model, context: list[int], width: int, forward=forward) -> np.ndarray:
    """The full forward's next-token logits after `context`, right-padded to `width` tokens so
    one compilation serves every length (causality hides the padding from earlier positions)."""
    padded = jnp.asarray(context + [0] * (width - len(context)), jnp.int32)
    return np.asarray(forward(model, padded)[len(context) - 1])


def greedy_cropped(model, prompt, n) -> np.ndarray:
    """Greedy decoding as nanoGPT does it: the model on the last block_size tokens, every step."""
    history = list(prompt)
    for _ in range(n):
        window = history[-model.block_size:]
        history.append(int(np.argmax(last_logits(model, window, model.block_size))))
    return np.array(history[len(prompt):])


def greedy_shifted(model, prompt, n, keep=0.5) -> np.ndarray:
    """Greedy decoding with llama.cpp's context shift, by full forwards: once the context holds
    more than block_size tokens, only its last `keep * block_size` remain, at positions 0.."""
    context, out = list(prompt[-model.block_size:]), []
    for _ in range(n):
        out.append(int(np.argmax(last_logits(model, context, model.block_size))))
        context.append(out[-1])
        if len(context) > model.block_size:
            context = context[-max(1, int(keep * model.block_size)):]
    return np.array(out)
