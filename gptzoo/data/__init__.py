"""Tokenizers, corpora (token shards on disk) and the batch loader."""

from gptzoo.data.batch_schedule import BatchSchedule
from gptzoo.data.corpus import Corpus, prepare_corpus
from gptzoo.data.loader import Batches, Prefetcher
from gptzoo.data.shards import TokenSplit
from gptzoo.data.text import SHAKESPEARE, all_windows, eval_windows, n_windows
from gptzoo.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer_file,
    tokenizer_from_dict,
    train_bpe,
)

__all__ = ["SHAKESPEARE", "BatchSchedule", "Batches", "ByteTokenizer", "CharTokenizer", "Corpus",
           "HFTokenizer", "Prefetcher", "TokenSplit", "Tokenizer", "all_windows", "eval_windows",
           "load_tokenizer_file", "n_windows", "prepare_corpus", "tokenizer_from_dict",
           "train_bpe"]
