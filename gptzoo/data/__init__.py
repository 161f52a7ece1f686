"""Tokenizers, corpora (token shards on disk) and the batch loader."""

from gptzoo.data.text import SHAKESPEARE, all_windows, random_windows, read_text, split
from gptzoo.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer_file,
    tokenizer_from_dict,
    train_bpe,
)

__all__ = ["SHAKESPEARE", "ByteTokenizer", "CharTokenizer", "HFTokenizer", "Tokenizer",
           "all_windows", "load_tokenizer_file", "random_windows", "read_text", "split",
           "tokenizer_from_dict", "train_bpe"]
