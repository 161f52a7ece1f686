from collections.abc import Iterable

import numpy as np

from gptzoo.errors import GptzooError


class CharTokenizer:
    """One token per distinct character of the training text, in sorted order (nanoGPT's char)."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise GptzooError(
                f"text has characters outside the model's vocabulary: {''.join(unknown)!r}; "
                "use only characters that occur in the training text"
            )
        return np.array([self.index[c] for c in text], dtype=np.int32)

    def decode(self, tokens: Iterable[int]) -> str:
        return "".join(self.chars[int(t)] for t in tokens)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        return cls(d["chars"])
