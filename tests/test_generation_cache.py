"""KV-cached generation's cache and programs: a long window decoded over only the cache slots it
holds (extents) and when caches are read by extent; the uncached fallback for models that cannot
cache; that prompt lengths in one bucket share a compilation; and edge cases (no new tokens, an
empty prompt, characters split across streamed chunks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generation_models import (
    BLOCK_SIZE,
    D_MODEL,
    N_NEW,
    PROMPT,
    V,
    build,
    compose,
    generate,
    greedy_cropped,
    greedy_shifted,
    randomize,
)

from gptzoo import nn
from gptzoo.errors import GptzooError
from gptzoo.models import gpt2
from gptzoo.sample import decode_chunk, generate_tokens, layout, loop, prefill
from gptzoo.sample.programs import merge_rows


def test_a_long_window_is_decoded_over_only_the_cache_slots_it_holds(monkeypatch):
    """With a 256-token window the first tokens are decoded over the cache's first 64 slots,
    then its first 128, then all of them, in a batch whose rows fill them at different tokens
    (one chunk ends at position 64 exactly): after every chunk the cache equals decoding over all
    its slots, and greedy tokens equal the full forward's, past the window too."""
    model = randomize(gpt2(V, n_layers=1, n_heads=2, d_model=16, block_size=256,
                           key=jax.random.PRNGKey(2)), seed=3)
    prompts = [PROMPT, np.random.default_rng(4).integers(0, V, 33)]
    chunk = decode_chunk

    def run(min_extent: int, **kwargs):
        monkeypatch.setattr(layout, "MIN_EXTENT", min_extent)
        extents, caches = [], []

        def recorded(*args):
            state, tokens = chunk(*args)
            extents.append(args[-1])
            caches.append(jax.tree.map(np.asarray, state.cache))  # before it is donated
            return state, tokens
        monkeypatch.setattr(loop, "decode_chunk", recorded)
        return generate(model, prompts, n=280, **kwargs), extents, caches

    tokens, extents, caches = run(64, seeds=[1, 2])
    whole_tokens, whole_extents, whole_caches = run(256, seeds=[1, 2])
    assert list(dict.fromkeys(extents)) == [64, 128, 256] and set(whole_extents) == {256}
    np.testing.assert_array_equal(tokens, whole_tokens)
    for cache, whole in zip(caches, whole_caches, strict=True):
        np.testing.assert_array_equal(cache[0].positions, whole[0].positions)
        np.testing.assert_allclose(cache[0].k, whole[0].k, atol=1e-6)
        np.testing.assert_allclose(cache[0].v, whole[0].v, atol=1e-6)
    greedy, _, _ = run(64, temperature=0)
    for row, prompt in zip(greedy, prompts, strict=True):
        np.testing.assert_array_equal(row, greedy_shifted(model, prompt, 280))


def test_caches_of_an_eighth_of_the_weights_or_more_are_read_by_extent():
    model = gpt2(5000, n_layers=1, n_heads=2, d_model=16, block_size=256,
                 key=jax.random.PRNGKey(0))  # 34 kB of cache per row, 350 kB of weights

    def rows(n: int):
        return jax.tree.map(lambda a: jnp.stack([a] * n), model.init_cache())
    assert [layout.reads_by_extent(model, rows(n)) for n in (1, 2)] == [False, True]
    assert not layout.reads_by_extent(model, None)  # no cache: recomputed


def test_extents_are_halves_of_the_window_down_to_min_extent():
    assert [layout.extent(1024, end) for end in (1, 64, 65, 256, 257, 1024, 1100)] == [
        64, 64, 128, 256, 512, 1024, 1024]
    assert [layout.extent(256, end) for end in (1, 64, 65, 129)] == [64, 64, 128, 256]
    assert layout.extent(96, 1) == 96  # a half would be below MIN_EXTENT


# Models that cannot cache fall back to recomputing the context


@pytest.mark.parametrize("name, model", [
    ("head-qk", lambda: compose(learned=True, head_qk=True)),
    ("sgu", lambda: compose(mlp=lambda k: nn.SGUMLP(D_MODEL, BLOCK_SIZE, hidden_mult=1, key=k))),
], ids=["head-qk", "sgu"])
def test_models_that_mix_positions_are_sampled_without_cache(name, model):
    model = model()
    assert not model.cacheable
    np.testing.assert_array_equal(generate(model, [PROMPT], temperature=0, context="crop")[0],
                                  greedy_cropped(model, PROMPT, N_NEW))
    np.testing.assert_array_equal(generate(model, [PROMPT], temperature=0)[0],
                                  greedy_shifted(model, PROMPT, N_NEW))


# Compilation


def test_prompt_lengths_in_one_bucket_share_the_compiled_programs():
    def compiled() -> np.ndarray:  # decode chunks, prefills, merges of shifted and decoded rows
        return np.array([f.n_compiled for f in (decode_chunk, prefill, merge_rows)])

    # A shape no other test compiles, so that the counts start here.
    model = gpt2(V, n_layers=1, n_heads=2, d_model=24, block_size=BLOCK_SIZE,
                 key=jax.random.PRNGKey(0))
    before = compiled()
    # Past the window, the prompt is padded to the length every shift re-encodes: one prefill
    # serves the prompt and the shifts.
    generate(model, [PROMPT[:3]], seeds=[0])
    np.testing.assert_array_equal(compiled() - before, [1, 1, 0])
    generate(model, [PROMPT], n=N_NEW + 9, seeds=[1])  # another prompt length and max_new_tokens
    np.testing.assert_array_equal(compiled() - before, [1, 1, 0])
    generate(model, [PROMPT[:3]], n=7, seeds=[0])  # inside the window: the prompt's own bucket
    np.testing.assert_array_equal(compiled() - before, [1, 2, 0])
    generate(model, [np.arange(10) % V], n=7, seeds=[1])
    generate(model, [PROMPT[:3]], n=5, seeds=[2])
    np.testing.assert_array_equal(compiled() - before, [1, 2, 0])
    generate(model, [PROMPT[:3], PROMPT[:3]], n=5)  # the counter does count: a new batch size
    np.testing.assert_array_equal(compiled() - before, [2, 3, 0])


# Edge cases


def test_max_new_tokens_0_generates_nothing():
    assert list(generate_tokens(build("gpt2"), [PROMPT], max_new_tokens=0)) == []


def test_an_empty_prompt_is_an_error():
    with pytest.raises(GptzooError, match="prompt is empty"):
        generate(build("gpt2"), [PROMPT, np.array([], np.int32)])


def test_a_character_split_across_chunks_is_streamed_whole():
    from gptzoo.data import ByteTokenizer
    from gptzoo.sample import TextStream

    tokenizer = ByteTokenizer()
    text = "héllo, 世界, 語のテキストです。"
    data = list(text.encode("utf-8"))
    for size in (1, 2, 16):  # 16: the decode chunk, longer than what a stream holds back
        stream = TextStream(tokenizer)
        pieces = [stream.push(data[i:i + size]) for i in range(0, len(data), size)]
        assert "".join(pieces + [stream.flush()]) == text
        assert all("\ufffd" not in p for p in pieces)
    cut_short = TextStream(tokenizer)
    assert cut_short.push(data[-3:-1]) == "" and cut_short.flush() == "\ufffd"  # 。cut short
    broken = TextStream(tokenizer)  # bytes that never make a character are shown once each
    pieces = [broken.push([0x80]) for _ in range(11)] + [broken.flush()]
    assert "".join(pieces) == "\ufffd" * 11


def test_pieces_keep_the_spaces_a_sentencepiece_decoder_drops_at_the_start():
    """LLaMA's decoder drops the space that starts the decoded text: each piece is decoded after
    the tokens before it, the first after the prompt's, so the spaces between pieces stay."""
    from test_tokenizers import MIXED, llama_style_tokenizer

    from gptzoo.sample import TextStream

    tokenizer = llama_style_tokenizer()
    prompt, tokens = tokenizer.encode("ROMEO:"), list(tokenizer.encode(MIXED))
    expected = tokenizer.decode([*prompt, *tokens])[len("ROMEO:"):]
    assert expected.startswith(" ROMEO: the café")
    for size in (1, 2, 3, 16):
        stream = TextStream(tokenizer, context=prompt)
        pieces = [stream.push(tokens[i:i + size]) for i in range(0, len(tokens), size)]
        assert "".join(pieces + [stream.flush()]) == expected, size
