"""Tokenizers: one interface, three kinds.

- `CharTokenizer`: one token per distinct character of the corpus (nanoGPT's char model).
- `ByteTokenizer`: the 256 byte values of UTF-8 text; nothing to train.
- `HFTokenizer`: any Hugging Face `tokenizers` tokenizer, from a `tokenizer.json` (GPT-2's, a
  LLaMA's) or a byte-level BPE trained on the training split (`train_bpe`).

Every kind has `encode(text) -> int32 array`, `decode(tokens) -> str`, `token_bytes(token)`
(the bytes one token stands for, a whole character or not), `vocab_size`, `end_of_text` (an id
or None), `start_tokens()` (what an empty prompt starts from), `to_dict()`, `save(run_dir)` and
`to_hf()` (the same ids as a Hugging Face tokenizer, for `export-hf`);
`tokenizer_from_dict` rebuilds whichever kind a checkpoint holds.
"""

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
from jaxtyping import Int

from gptzoo.data.token_bytes import byte_symbols, hf_token_bytes
from gptzoo.errors import GptzooError

END_OF_TEXT = "<|endoftext|>"
# Names published tokenizers give the token that separates documents, in order of preference.
_END_OF_TEXT_NAMES = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>")
FILE_NAME = "tokenizer.json"


class OutOfVocabulary(GptzooError):
    """Text a character tokenizer has no token for."""


class Tokenizer(Protocol):
    vocab_size: int
    end_of_text: int | None

    def encode(self, text: str) -> Int[np.ndarray, " n"]: ...
    def decode(self, tokens: Iterable[int]) -> str: ...
    def token_bytes(self, token: int) -> bytes: ...
    def start_tokens(self) -> Int[np.ndarray, " n"]: ...
    def to_dict(self) -> dict: ...
    def save(self, run_dir: Path) -> Path: ...
    def to_hf(self): ...


class _Saved:
    def save(self, run_dir: str | Path) -> Path:
        """Write `tokenizer.json` into `run_dir`: a Hugging Face file for the HF kinds (usable
        by `transformers` and as another recipe's `data.tokenizer`), else gptzoo's own dict."""
        path = Path(run_dir) / FILE_NAME
        path.write_text(self._file_text())
        return path

    def _file_text(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]


class CharTokenizer(_Saved):
    """One token per distinct character of the training text, in sorted order (nanoGPT's char)."""

    end_of_text = None  # documents are simply concatenated, as the char models always were

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Int[np.ndarray, " n"]:
        # Vectorised over code points: prepare encodes gigabytes through here.
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, codepoints).clip(0, max(self.vocab_size - 1, 0))
        if len(codepoints) and (not self.vocab_size
                                or not np.array_equal(self._codepoints[ids], codepoints)):
            unknown = sorted(set(text) - self.index.keys())
            raise OutOfVocabulary(
                f"text has characters outside the model's vocabulary: {''.join(unknown)!r}; "
                "use only characters that occur in the training text"
            )
        return ids.astype(np.int32)

    def decode(self, tokens: Iterable[int]) -> str:
        return "".join(self.chars[int(t)] for t in tokens)

    def token_bytes(self, token: int) -> bytes:
        return self.chars[int(token)].encode("utf-8")

    def start_tokens(self) -> Int[np.ndarray, " n"]:
        # An empty prompt starts from a newline, as nanoGPT's sample.py does, or the first token.
        return self.encode("\n" if "\n" in self.index else self.chars[0])

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars)}

    def to_hf(self):
        """A BPE over the characters with no merges, so that each character (code point) is its
        own token with its own id, and a decoder that joins them without spaces."""
        from tokenizers import Tokenizer as HF
        from tokenizers import decoders, models

        tokenizer = HF(models.BPE(vocab=dict(self.index), merges=[]))
        tokenizer.decoder = decoders.Fuse()
        return tokenizer

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        return cls(d["chars"])


class ByteTokenizer(_Saved):
    """The UTF-8 bytes of the text, one token each: every string round-trips, nothing to train."""

    vocab_size = 256
    end_of_text = None  # all 256 ids are bytes

    def encode(self, text: str) -> Int[np.ndarray, " n"]:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, tokens: Iterable[int]) -> str:
        # A sample may stop inside a multi-byte character: show U+FFFD there rather than fail.
        return bytes(np.asarray(list(tokens), dtype=np.uint8)).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return bytes([int(token)])

    def start_tokens(self) -> Int[np.ndarray, " n"]:
        return self.encode("\n")

    def to_dict(self) -> dict:
        return {"kind": "bytes"}

    def to_hf(self):
        """GPT-2's byte-level alphabet (each byte one printable symbol) as a BPE of those 256
        symbols, id the byte value, with no merges: every text is its UTF-8 bytes, and decoding
        joins the bytes back and replaces a broken character with U+FFFD, as `decode` does."""
        from tokenizers import Tokenizer as HF
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
        tokenizer = HF(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                           use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer


class HFTokenizer(_Saved):
    """A Hugging Face `tokenizers.Tokenizer`: a trained byte-level BPE or any `tokenizer.json`."""

    def __init__(self, tokenizer, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.source = source  # named in error messages
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = (tokenizer.token_to_id(name) for name in _END_OF_TEXT_NAMES)
        self.end_of_text = next((i for i in ids if i is not None), None)
        self._token_bytes = None  # made on first use

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as HF

        path = Path(path)
        if path.is_dir():
            raise GptzooError(f"tokenizer {path} is a folder without a {FILE_NAME}; set "
                              "data.tokenizer to char, bytes, bpe or the path of a tokenizer.json")
        if not path.is_file():
            raise GptzooError(f"tokenizer file {path} does not exist; set data.tokenizer to char, "
                              "bytes, bpe or the path of a tokenizer.json")
        try:
            return cls(HF.from_file(str(path)), source=str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any malformed file
            raise GptzooError(f"tokenizer file {path} is not a readable Hugging Face "
                              f"tokenizer.json ({str(e).splitlines()[0][:120]}); point "
                              "data.tokenizer at a valid tokenizer.json") from e

    @classmethod
    def from_json(cls, text: str, source: str = "checkpoint") -> "HFTokenizer":
        from tokenizers import Tokenizer as HF

        return cls(HF.from_str(text), source=source)

    def encode(self, text: str) -> Int[np.ndarray, " n"]:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encode on all cores (the Rust side runs the texts in parallel)."""
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        if self._token_bytes is None:
            self._token_bytes = hf_token_bytes(self.tokenizer)
        return self._token_bytes(int(token))

    def start_tokens(self) -> Int[np.ndarray, " n"]:
        if self.end_of_text is not None:
            return np.array([self.end_of_text], np.int32)
        return self.encode("\n")

    def to_dict(self) -> dict:
        return {"kind": "hf", "json": self.tokenizer.to_str()}

    def to_hf(self):
        return self.tokenizer

    def _file_text(self) -> str:
        return self.tokenizer.to_str(pretty=True)


def train_bpe(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
    """A GPT-2-style byte-level BPE of `vocab_size` tokens (the 256 bytes, merges, and
    `<|endoftext|>`), trained on `texts`, streamed (`tokenizers` counts words as it goes)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = 256 + 1
    if vocab_size < minimum:
        raise GptzooError(f"data.vocab_size={vocab_size} is below {minimum} (256 byte tokens and "
                          f"{END_OF_TEXT}); use --set data.vocab_size=1024 or more")
    tokenizer = HF(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return HFTokenizer(tokenizer, source="trained byte-level BPE")


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """A `tokenizer.json`: a Hugging Face file, or the one a char/bytes run saved; or the one in
    the folder `path` (a run's, a Hugging Face model's)."""
    path = Path(path)
    if path.is_dir() and (path / FILE_NAME).is_file():
        path = path / FILE_NAME
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = None  # HFTokenizer.from_file names the problem
    if isinstance(saved, dict) and saved.get("kind") in ("char", "bytes"):
        return tokenizer_from_dict(saved)
    return HFTokenizer.from_file(path)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild the tokenizer whose `to_dict()` this is (as stored in every checkpoint)."""
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer.from_dict(d)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.from_json(d["json"])
    raise GptzooError(f"unknown tokenizer kind {kind!r} in a checkpoint; it was written by a newer "
                      "gptzoo: upgrade gptzoo")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """A short digest of everything that decides the token ids."""
    text = json.dumps(tokenizer.to_dict(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
