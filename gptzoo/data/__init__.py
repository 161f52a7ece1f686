"""Tokenizers, text files and batching."""

from gptzoo.data.text import SHAKESPEARE, all_windows, random_windows, read_text, split
from gptzoo.data.tokenizer import CharTokenizer

__all__ = ["SHAKESPEARE", "CharTokenizer", "all_windows", "random_windows", "read_text", "split"]
