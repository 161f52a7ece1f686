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


def llama_style_tokenizer() -> HFTokenizer:
    """A tokenizer laid out as LLaMA 2's and Mistral's `tokenizer.json`: a BPE over words marked
    with `▁`, `<0xNN>` tokens for bytes outside its vocabulary, and a decoder that turns `▁` into
    a space and drops the space that starts the decoded text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                 normalizers.Replace(" ", "\u2581")])
    tokenizer.train_from_iterator([SHAKESPEARE.read_text()[:20_000]], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    trained = json.loads(tokenizer.to_str())["model"]
    vocab = trained["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer.model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return HFTokenizer(tokenizer)


MIXED = "ROMEO: the café, 😀 and 語!"


def test_token_bytes_join_into_the_texts_bytes(bpe):
    llama = llama_style_tokenizer()
    assert llama.decode(llama.encode(MIXED)) == MIXED
    for tokenizer, text in ((ByteTokenizer(), MIXED), (bpe, MIXED), (llama, MIXED),
                            (CharTokenizer.from_text(MIXED), MIXED)):
        tokens = tokenizer.encode(text)
        pieces = [tokenizer.token_bytes(t) for t in tokens]
        # SentencePiece marks the first word as spaced too; its decoder drops that space.
        expected = (" " + text if tokenizer is llama else text).encode("utf-8")
        assert b"".join(pieces) == expected, tokenizer
        if not isinstance(tokenizer, CharTokenizer):  # some token holds part of a character
            assert any(p.decode("utf-8", errors="replace") != p.decode("utf-8", errors="ignore")
                       for p in pieces)
    assert bpe.token_bytes(bpe.end_of_text) == b"<|endoftext|>"


def test_a_token_inside_a_character_is_named_by_its_bytes():
    from gptzoo.data.token_bytes import token_string

    assert token_string(b" caf\xc3\xa9") == " café"
    assert token_string(b"\xe8\xaa") == "bytes:\\xe8\\xaa"
