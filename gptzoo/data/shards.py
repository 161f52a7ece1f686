"""Token shards: one split's tokens in `{train,val}_NNNNN.bin` files of a fixed dtype, written
piece by piece and read back through memory maps, never all loaded."""

import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from jaxtyping import Int

from gptzoo.data.sources import Piece
from gptzoo.data.tokenizer import Tokenizer
from gptzoo.errors import GptzooError

SPLITS = ("train", "val")
SHARD_TOKENS = 1 << 26  # tokens per shard file (128 MB of uint16)
BATCH_BYTES = 8 << 20  # text per encode_batch call: parallel, with bounded memory


def shard_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token of the vocabulary."""
    for dtype in (np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise GptzooError(f"a vocabulary of {vocab_size:,} tokens does not fit uint32 token shards; "
                      "use a tokenizer with at most 2**32 tokens")


def _random_access_map(path: Path) -> mmap.mmap:
    """A shard file mapped read-only, advised that it is read at random places (no readahead)."""
    with path.open("rb") as f:
        pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pages.madvise(mmap.MADV_RANDOM)
    return pages


class TokenSplit:
    """One split's tokens across its shard files, read through memory maps, never all loaded.

    `split[a:b]` and `split.windows(starts, length)` return int32 arrays.

    **Arguments:**

    - `folder`: the folder that holds the shard files.
    - `info`: the split's entry of the manifest: its `shards` (each a `file` name) and `bytes`
        (the source text's size, for `bytes_per_token`).
    - `dtype`: the shards' token dtype (`shard_dtype`).
    - `name`: the split's name in error messages ("training", "validation").
    - `source`: the corpus's `data.path`, for error messages.
    """

    def __init__(self, folder: Path, info: dict, dtype: str, name: str, source: str):
        self.pages = [_random_access_map(folder / s["file"]) for s in info["shards"]]
        self.maps = [np.frombuffer(pages, dtype=dtype) for pages in self.pages]
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])
        self.n_bytes = info["bytes"]
        self.name, self.source = name, source  # for error messages

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(len(self), 1)

    def __getitem__(self, index: slice) -> Int[np.ndarray, " n"]:
        start, stop, _ = index.indices(len(self))
        parts, shard = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
        first = shard
        while start < stop:
            local = start - self.offsets[shard]
            part = self.maps[shard][local: min(stop - self.offsets[shard], len(self.maps[shard]))]
            parts.append(part)
            start, shard = start + len(part), shard + 1
        tokens = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        self._release(range(first, shard))
        return tokens

    def windows(self, starts: Int[np.ndarray, " rows"], length: int) -> Int[np.ndarray, "rows n"]:
        """The `length` tokens from each of `starts`: one gather per shard, the rare window that
        crosses a shard boundary on its own."""
        out = np.empty((len(starts), length), np.int32)
        shard_of = np.searchsorted(self.offsets, starts, side="right") - 1
        for shard in np.unique(shard_of):
            rows = np.nonzero(shard_of == shard)[0]
            local = starts[rows] - self.offsets[shard]
            inside = local + length <= len(self.maps[shard])
            out[rows[inside]] = self.maps[shard][local[inside, None] + np.arange(length)]
            for row in rows[~inside]:
                out[row] = self[starts[row]: starts[row] + length]
        self._release(np.unique(shard_of))
        return out

    def _release(self, shards) -> None:
        """Unmap the pages just copied out. The kernel maps file pages around each one read
        (fault-around), and they stay counted in the process's resident memory, which grows with
        all a long run has sampled (docs/benchmarks.md, "Design choices"). Released, they stay
        in the page cache for the next read, and the process holds only what it is using."""
        for shard in shards:
            self.pages[shard].madvise(mmap.MADV_DONTNEED)

    def require(self, n_tokens: int, what: str) -> None:
        """Refuse a split shorter than `n_tokens`, which `what` (settings) needs."""
        if len(self) < n_tokens:
            raise GptzooError(f"the {self.name} split of {self.source} has {len(self):,} tokens, "
                              f"fewer than {what} = {n_tokens:,}; use a bigger corpus or lower "
                              "those settings")


def write_shards(folder: Path, tokenizer: Tokenizer, pieces: Iterator[Piece]) -> dict:
    """Encode the pieces in batches of `BATCH_BYTES` into each split's shards under `folder`;
    each split's shards, token count and source bytes, for the manifest."""
    dtype = shard_dtype(tokenizer.vocab_size)
    writers = [_ShardWriter(folder, name, dtype) for name in SPLITS]
    batch: list[Piece] = []

    def flush():
        encoded = tokenizer.encode_batch([p.text for p in batch])
        for piece, tokens in zip(batch, encoded, strict=True):
            if len(tokens) and tokens.max() >= tokenizer.vocab_size:
                raise GptzooError(f"the tokenizer produced token {int(tokens.max())}, beyond its "
                                  f"vocab_size {tokenizer.vocab_size}; its tokenizer.json is "
                                  "inconsistent: fix its added_tokens or use another tokenizer")
            writers[piece.split].write(tokens, piece, tokenizer.end_of_text)
        batch.clear()

    for piece in pieces:
        batch.append(piece)
        if sum(p.n_bytes for p in batch) >= BATCH_BYTES:
            flush()
    flush()
    return {name: w.close() for name, w in zip(SPLITS, writers, strict=True)}


class _ShardWriter:
    """One split's shard files, `{name}_NNNNN.bin` of `SHARD_TOKENS` tokens each, written in
    order; a new document starts with the tokenizer's end-of-text token, if it has one.

    **Arguments:**

    - `folder`: where the files go.
    - `name`: the split's name ("train", "val"), the files' prefix.
    - `dtype`: the tokens' dtype (`shard_dtype`).
    """

    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.shards: list[dict] = []
        self.n_bytes = 0
        self.file = None

    def write(self, tokens: np.ndarray, piece: Piece, end_of_text: int | None) -> None:
        """Append `piece`'s tokens, after `end_of_text` when it starts a document."""
        if piece.new_document and end_of_text is not None and (self.shards or self.file):
            tokens = np.concatenate([[end_of_text], tokens])
        self.n_bytes += piece.n_bytes
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == SHARD_TOKENS:
                self._next_shard()
            room = SHARD_TOKENS - self.shards[-1]["tokens"]
            self.file.write(tokens[:room].astype(self.dtype).tobytes())
            self.shards[-1]["tokens"] += len(tokens[:room])
            tokens = tokens[room:]

    def _next_shard(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.name}_{len(self.shards):05d}.bin"
        self.file = (self.folder / name).open("wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> dict:
        """Close the last file; the split's shards, token count and source bytes."""
        if self.file is not None:
            self.file.close()
        total = sum(s["tokens"] for s in self.shards)
        return {"shards": self.shards, "tokens": total, "bytes": self.n_bytes}
