"""Top-k, top-p and per-sample seeds change what is sampled, through `generate`, `generate_tokens`
and `gptzoo sample`, checked against greedy decoding and against the nucleus and top-k sets
computed here in float64 from the model's full forward (no cache). Each test would fail if its
option were ignored: at temperature 5 the tiny run's model samples well outside them."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from test_sample_cli import SEPARATOR, sample

import gptzoo
from gptzoo.sample import generate, generate_tokens

PROMPT = "ROMEO:"
N_NEW = 24  # prompt and continuation within block_size (32): one full forward scores them all
HOT = 5.0  # a temperature at which the model's draws leave any small set of tokens
TIE = 1e-4  # cached and full-forward logits differ in float32 rounding: near-ties are allowed
SEEDS = [4, 5, 6, 7]  # one batch shape and one set of options per program, shared by the tests
forward = eqx.filter_jit(lambda model, tokens: model(tokens))


@pytest.fixture(scope="module")
def loaded(trained_run):
    return gptzoo.load(trained_run)


def next_token_logits(model, tokens: list[int]) -> np.ndarray:
    """float64 logits predicting each token after the first, from one full forward."""
    return np.asarray(forward(model, jnp.asarray(tokens, jnp.int32)), np.float64)[:-1]


def top_k_ranks(model, prompt: list[int], new: list[int]) -> list[int]:
    """Each new token's rank among the full forward's logits (0: the most likely), a logit within
    `TIE` of a higher one counting as tied with it."""
    logits = next_token_logits(model, prompt + new)[len(prompt) - 1:]
    return [int((row > row[t] + TIE).sum()) for row, t in zip(logits, new, strict=True)]


def draws(model, tokenizer, seeds, **options) -> list[list[int]]:
    prompt = tokenizer.encode(PROMPT)
    rows = generate_tokens(model, [prompt] * len(seeds), max_new_tokens=N_NEW, seeds=seeds,
                           **options)
    return np.concatenate(list(rows), axis=1).tolist()


def test_top_k_1_and_a_tiny_top_p_at_a_high_temperature_are_greedy(loaded):
    model, tokenizer = loaded
    greedy = generate(model, tokenizer, PROMPT, max_new_tokens=N_NEW, temperature=0)
    for seed in SEEDS[:2]:
        options = {"max_new_tokens": N_NEW, "temperature": HOT, "seed": seed}
        assert generate(model, tokenizer, PROMPT, **options) != greedy
        assert generate(model, tokenizer, PROMPT, top_k=1, **options) == greedy
        assert generate(model, tokenizer, PROMPT, top_p=1e-6, **options) == greedy


def test_top_k_2_only_ever_emits_the_two_most_likely_tokens(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode(PROMPT).tolist()
    restricted = [r for row in draws(model, tokenizer, SEEDS, temperature=HOT, top_k=2)
                  for r in top_k_ranks(model, prompt, row)]
    unrestricted = [r for row in draws(model, tokenizer, SEEDS, temperature=HOT)
                    for r in top_k_ranks(model, prompt, row)]
    assert set(restricted) == {0, 1}  # both of the two, never a third
    assert np.mean(np.array(unrestricted) >= 2) > 0.5


def nucleus_position(model, prompt: list[int], new: list[int], top_p: float, temperature: float
                     ) -> list[float]:
    """For each new token, the probability held by the tokens ranked above it (float64 softmax
    of the full forward's logits / temperature): below `top_p` inside the nucleus."""
    logits = next_token_logits(model, prompt + new)[len(prompt) - 1:] / temperature
    out = []
    for row, token in zip(logits, new, strict=True):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        out.append(float(probs[probs > probs[token] + TIE].sum()))
    return out


def test_top_p_only_ever_emits_tokens_of_the_nucleus(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode(PROMPT).tolist()
    top_p = 0.5
    inside = [held for row in draws(model, tokenizer, SEEDS, temperature=HOT, top_p=top_p)
              for held in nucleus_position(model, prompt, row, top_p, HOT)]
    outside = [held for row in draws(model, tokenizer, SEEDS, temperature=HOT)
               for held in nucleus_position(model, prompt, row, top_p, HOT)]
    assert max(inside) < top_p and min(inside) == 0 and max(inside) > 0  # not greedy either
    assert np.mean(np.array(outside) >= top_p) > 0.3


def test_each_sample_draws_from_its_own_seed_alone(loaded):
    model, tokenizer = loaded
    rows = draws(model, tokenizer, SEEDS, temperature=HOT)
    assert len({tuple(r) for r in rows}) == len(SEEDS)
    for seed, row in zip(SEEDS, rows, strict=True):
        assert draws(model, tokenizer, [seed], temperature=HOT) == [row]


# The same through `gptzoo sample`.

ARGS = ("--prompt", PROMPT, "--max-new-tokens", str(N_NEW))


def test_cli_top_k_1_and_a_tiny_top_p_at_a_high_temperature_are_greedy(trained_run):
    greedy = sample(trained_run, *ARGS, "--temperature", "0")
    hot = (*ARGS, "--temperature", str(HOT), "--seed", str(SEEDS[0]))
    assert sample(trained_run, *hot) != greedy
    assert sample(trained_run, *hot, "--top-k", "1") == greedy
    assert sample(trained_run, *hot, "--top-p", "1e-6") == greedy


def test_cli_top_k_2_only_ever_emits_the_two_most_likely_tokens(trained_run, loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode(PROMPT).tolist()
    out = sample(trained_run, *ARGS, "--temperature", str(HOT), "--top-k", "2",
                 "--seed", str(SEEDS[0]), "--num-samples", str(len(SEEDS)))
    texts = out.split(SEPARATOR)
    assert len(texts) == len(SEEDS)
    found = [r for text in texts
             for r in top_k_ranks(model, prompt, tokenizer.encode(text[len(PROMPT):]).tolist())]
    assert set(found) == {0, 1}


def test_cli_num_samples_use_seeds_seed_to_seed_plus_n_each_as_alone(trained_run):
    hot = (*ARGS, "--temperature", str(HOT))
    texts = sample(trained_run, *hot, "--seed", str(SEEDS[0]), "--num-samples", str(len(SEEDS)))
    texts = texts.split(SEPARATOR)
    assert len(set(texts)) == len(SEEDS)
    for seed, text in zip(SEEDS, texts, strict=True):
        assert sample(trained_run, *hot, "--seed", str(seed)) == text
