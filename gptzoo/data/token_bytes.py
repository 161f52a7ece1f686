"""The bytes a single token stands for, which decoding it alone may not show: a byte-level
token can hold part of a UTF-8 character (it decodes to U+FFFD), and a SentencePiece token's
leading space is dropped where the decoded text starts. Log-probabilities report tokens by
these bytes (OpenAI's `bytes`, and `bytes:\\xNN` for a token that is no whole text)."""

import json
import re
from collections.abc import Callable

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_symbols() -> list[str]:
    """GPT-2's symbol for each byte value: printable Latin-1 bytes stand for themselves, the
    others for the code points from 256 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def hf_token_bytes(tokenizer) -> Callable[[int], bytes]:
    """For a Hugging Face `tokenizers.Tokenizer`, a function from a token id to its bytes, read
    the way its decoder reads the token's string: byte-level (GPT-2's symbols), SentencePiece's
    `▁` for a space and `<0xNN>` byte fallback, else the token decoded alone."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    byte_of = {symbol: byte for byte, symbol in enumerate(byte_symbols())}

    def token_bytes(token: int) -> bytes:
        piece = tokenizer.id_to_token(token)
        if piece is None or token in special:
            return tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
        if "ByteLevel" in kinds and all(c in byte_of for c in piece):
            return bytes(byte_of[c] for c in piece)
        if "ByteFallback" in kinds and (match := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(match[1], 16)])
        if kinds & {"Metaspace", "Replace", "ByteFallback"}:
            return piece.replace("\u2581", " ").encode("utf-8")
        return tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")

    return token_bytes


def token_string(token_bytes: bytes) -> str:
    """A token as OpenAI's log-probabilities name it: its text, or `bytes:` and its bytes
    escaped (`bytes:\\xe3\\x81`) where they are not whole UTF-8 text."""
    try:
        return token_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token_bytes)
