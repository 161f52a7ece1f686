"""The tokenizer kinds: exact round trips, rebuilding from checkpoints and files, clear errors."""

import json

import numpy as np
import pytest
from conftest import SHAKESPEARE

from gptzoo.data import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    load_tokenizer_file,
    tokenizer_from_dict,
    train_bpe,
)
from gptzoo.errors import GptzooError


def random_unicode(rng, n: int) -> str:
    """Code points from every plane: ASCII, accents, CJK, emoji, combining marks, controls."""
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    picks = rng.integers(len(ranges), size=n)
    return "".join(chr(int(rng.integers(lo, hi + 1))) for lo, hi in (ranges[i] for i in picks))


@pytest.fixture(scope="module")
def bpe():
    text = SHAKESPEARE.read_text()[:50_000]
    return train_bpe(iter(text[i:i + 5_000] for i in range(0, len(text), 5_000)), 400)


def test_bytes_and_bpe_round_trip_every_utf8_string(bpe):
    rng = np.random.default_rng(0)
    texts = [random_unicode(rng, int(n)) for n in rng.integers(0, 200, size=50)]
    texts += ["", " ", "\n\n  \t", "ROMEO: O, she doth teach the torches!", "é" * 5, "🙂👍🏽"]
    for tokenizer in (ByteTokenizer(), bpe):
        for text in texts:
            tokens = tokenizer.encode(text)
            assert tokens.dtype == np.int32
            assert tokens.size == 0 or (0 <= tokens.min() and tokens.max() < tokenizer.vocab_size)
            assert tokenizer.decode(tokens) == text


def test_bpe_has_its_size_an_end_of_text_token_and_compresses(bpe):
    assert bpe.vocab_size == 400
    assert bpe.decode([bpe.end_of_text]) == "<|endoftext|>"
    assert list(bpe.start_tokens()) == [bpe.end_of_text]
    text = SHAKESPEARE.read_text()[:5_000]
    assert len(bpe.encode(text)) < 0.6 * len(text.encode())  # merges learned from the text


def test_char_tokenizer_keeps_its_vocabulary_and_error():
    tokenizer = CharTokenizer.from_text("hello world\n")
    assert tokenizer.vocab_size == 9 and tokenizer.chars[0] == "\n"
    assert list(tokenizer.encode("lo")) == [tokenizer.index["l"], tokenizer.index["o"]]
    assert tokenizer.decode(tokenizer.encode("hello\nworld")) == "hello\nworld"
    assert list(tokenizer.start_tokens()) == [tokenizer.index["\n"]]
    with pytest.raises(GptzooError, match="outside the model's vocabulary: 'XZ'"):
        tokenizer.encode("hello XZ")


def test_every_kind_rebuilds_from_its_dict_and_its_saved_file(tmp_path, bpe):
    text = "To be, or not to be: that is the question.\n"
    for tokenizer in (CharTokenizer.from_text(text), ByteTokenizer(), bpe):
        d = json.loads(json.dumps(tokenizer.to_dict()))  # as a checkpoint's meta stores it
        rebuilt = tokenizer_from_dict(d)
        assert type(rebuilt) is type(tokenizer) and rebuilt.to_dict() == tokenizer.to_dict()
        assert list(rebuilt.encode(text)) == list(tokenizer.encode(text))
        saved = tokenizer.save(tmp_path)
        assert saved.name == "tokenizer.json"
        assert load_tokenizer_file(saved).to_dict() == tokenizer.to_dict()


def test_a_gpt2_style_tokenizer_json_loads_with_its_end_of_text(tmp_path, bpe):
    from tokenizers import Tokenizer

    path = bpe.save(tmp_path)  # a byte-level BPE file, laid out as GPT-2's
    assert Tokenizer.from_file(str(path)).get_vocab_size() == 400  # readable by HF itself
    loaded = HFTokenizer.from_file(path)
    assert loaded.end_of_text == bpe.end_of_text and loaded.vocab_size == 400


def test_unreadable_tokenizer_json_is_one_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "nonsense"}}')
    with pytest.raises(GptzooError, match=f"tokenizer file {bad} is not a readable"):
        load_tokenizer_file(bad)
    with pytest.raises(GptzooError, match="does not exist"):
        load_tokenizer_file(tmp_path / "missing.json")
