"""Corpora: documents from a text file, a folder, a glob or JSONL files, tokenised once into a cache
folder of token shards that training reads through memory maps.

The split is by position in the corpus: the sources, in sorted order, are laid end to end and the
first `1 - val_fraction` of their bytes train, the rest validate (a document across the boundary is
cut there), so the split does not depend on the tokenizer and a BPE learns from training text
only. Within a split, documents are separated by the tokenizer's end-of-text token, if it has one.

Cache folder: `<data.cache_dir or $GPTZOO_CACHE or ~/.cache/gptzoo>/<name>-<key>/` where the key
digests data.path, text_field, the tokenizer choice and val_fraction. It holds `manifest.json`
(sources with sizes and modification times, tokenizer hash, shards and their token counts, bytes
per split), `tokenizer.json` and `{train,val}_NNNNN.bin` shards. It is built in a temporary folder
and renamed into place when complete, so a killed prepare leaves nothing that is trusted later.
"""

import glob
import hashlib
import itertools
import json
import mmap
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Int

from gptzoo.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer_file,
    tokenizer_hash,
    train_bpe,
)
from gptzoo.errors import GptzooError
from gptzoo.processes import alive

FORMAT = 1  # bump when the cache layout changes: older caches are then rebuilt
PIECE_BYTES = 1 << 20  # text files are read and encoded in ~1 MB pieces, cut after a newline
BATCH_BYTES = 8 << 20  # text per encode_batch call: parallel, with bounded memory
SHARD_TOKENS = 1 << 26  # tokens per shard file (128 MB of uint16)
# A BPE learns its merges from at most this much training text, pieces taken evenly through the
# split: merges settle long before that, and counting words of gigabytes takes many minutes.
BPE_SAMPLE_BYTES = 64 << 20
SPLITS = ("train", "val")


@dataclass
class Piece:
    """A run of one document's text that lies in one split."""

    text: str
    n_bytes: int
    split: int  # index into SPLITS
    new_document: bool


def _random_access_map(path: Path) -> mmap.mmap:
    """A shard file mapped read-only, advised that it is read at random places (no readahead)."""
    with path.open("rb") as f:
        pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pages.madvise(mmap.MADV_RANDOM)
    return pages


class TokenSplit:
    """One split's tokens across its shard files, read through memory maps, never all loaded.

    `split[a:b]` and `split.windows(starts, length)` return int32 arrays.
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
        (fault-around), and they stay counted in the process's resident memory: 200 steps of
        random windows from a 2 GB corpus grew it by ~0.6 GB. Released, they stay in the page
        cache for the next read, and the process holds only what it is using."""
        for shard in shards:
            self.pages[shard].madvise(mmap.MADV_DONTNEED)

    def require(self, n_tokens: int, what: str) -> None:
        if len(self) < n_tokens:
            raise GptzooError(f"the {self.name} split of {self.source} has {len(self):,} tokens, "
                              f"fewer than {what} = {n_tokens:,}; use a bigger corpus or lower "
                              "those settings")


@dataclass
class Corpus:
    folder: Path
    tokenizer: Tokenizer
    train: TokenSplit
    val: TokenSplit
    manifest: dict


def prepare_corpus(cfg, tokenizer: Tokenizer | None = None,
                   log: Callable[[str], None] = print) -> Corpus:
    """The token shards of the corpus `cfg` (a `DataConfig`) describes: reused from the cache
    while its sources and tokenizer are unchanged, else built. `tokenizer` (a checkpoint's)
    forces that tokenizer rather than fitting one."""
    sources = find_sources(cfg)
    folder = cache_folder(cfg)
    wanted = tokenizer or _given_tokenizer(cfg)
    corpus = _open_cached(folder, cfg, sources, wanted)
    if corpus is not None:
        return corpus
    _build(folder, cfg, sources, wanted, log)
    return _open_cached(folder, cfg, sources, wanted)


def find_sources(cfg) -> list[dict]:
    """Every file `data.path` names, sorted, with the size and mtime the cache is checked by."""
    spec = cfg.path
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file()
                       and not any(p.startswith(".") for p in f.relative_to(path).parts))
        if not files:
            raise GptzooError(f"data.path={spec} is a folder with no files in it; put text or "
                              ".jsonl files in it or point data.path at another folder")
    elif any(c in spec for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            raise GptzooError(f"data.path={spec} matches no files; fix the pattern (** matches "
                              "any folder depth)")
    else:
        raise GptzooError(f"data file {path} does not exist; set data.path to a text file, a "
                          "folder, a glob or .jsonl files")
    return [{"path": str(f.absolute()), "size": f.stat().st_size,
             "mtime_ns": f.stat().st_mtime_ns} for f in files]


def cache_folder(cfg) -> Path:
    root = Path(cfg.cache_dir or os.environ.get("GPTZOO_CACHE") or "~/.cache/gptzoo").expanduser()
    tokenizer = cfg.tokenizer
    if tokenizer not in ("char", "bytes", "bpe"):
        tokenizer = str(Path(tokenizer).expanduser().absolute())
    key = {"path": str(Path(cfg.path).expanduser().absolute()), "text_field": cfg.text_field,
           "tokenizer": tokenizer, "val_fraction": cfg.val_fraction,
           "vocab_size": cfg.vocab_size if tokenizer == "bpe" else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.-]+", "_", Path(cfg.path).stem or "corpus").strip("_") or "corpus"
    return root / f"{name}-{digest}"


def shard_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise GptzooError(f"a vocabulary of {vocab_size:,} tokens does not fit uint32 token shards; "
                      "use a tokenizer with at most 2**32 tokens")


def _given_tokenizer(cfg) -> Tokenizer | None:
    """The tokenizer the recipe fixes in advance; None for the kinds fitted to the corpus."""
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer in ("char", "bpe"):
        return None
    return load_tokenizer_file(cfg.tokenizer)


def _open_cached(folder: Path, cfg, sources: list[dict], wanted: Tokenizer | None):
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        tokenizer = load_tokenizer_file(folder / "tokenizer.json")
    except (OSError, ValueError, GptzooError):
        return None
    if (manifest.get("format") != FORMAT or manifest.get("sources") != sources
            or manifest.get("tokenizer_hash") != tokenizer_hash(tokenizer)
            or (wanted is not None and tokenizer_hash(wanted) != manifest["tokenizer_hash"])):
        return None
    train, val = (TokenSplit(folder, manifest["splits"][s], manifest["dtype"], name, cfg.path)
                  for s, name in zip(SPLITS, ("training", "validation"), strict=True))
    return Corpus(folder, tokenizer, train, val, manifest)


def _build(folder: Path, cfg, sources: list[dict], tokenizer: Tokenizer | None, log) -> None:
    total = sum(s["size"] for s in sources)
    if total == 0:
        raise GptzooError(f"data.path={cfg.path} is empty; set data.path to a file with text in it")
    split_at = int(total * (1 - cfg.val_fraction))
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder)
    partial = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    started = time.perf_counter()
    try:
        with _progress(total, log) as advance:
            def pieces(label: str) -> Iterator[Piece]:
                return read_pieces(sources, split_at, cfg.text_field, advance(label))

            tokenizer = tokenizer or _fit_tokenizer(cfg, pieces, split_at)
            splits = _write_shards(partial, tokenizer, pieces("tokenising"))
        seconds = time.perf_counter() - started
        tokenizer.save(partial)
        manifest = {"format": FORMAT, "data_path": cfg.path, "sources": sources,
                    "tokenizer_hash": tokenizer_hash(tokenizer),
                    "vocab_size": tokenizer.vocab_size,
                    "dtype": shard_dtype(tokenizer.vocab_size).name, "split_byte": split_at,
                    "splits": splits, "seconds": seconds,
                    "mb_per_s": total / 1e6 / max(seconds, 1e-9)}
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        _replace(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"prepared {cfg.path}: {splits['train']['tokens']:,} training and "
        f"{splits['val']['tokens']:,} validation tokens in {seconds:.1f}s "
        f"({manifest['mb_per_s']:.1f} MB/s) into {folder}")


def _fit_tokenizer(cfg, pieces: Callable[[str], Iterator[Piece]], train_bytes: int) -> Tokenizer:
    if cfg.tokenizer == "char":  # every character of the corpus, as the char models always had
        chars = set()
        for piece in pieces("reading characters"):
            chars.update(piece.text)
        return CharTokenizer(chars)
    every = -(-train_bytes // BPE_SAMPLE_BYTES)  # 1 (all of it) up to BPE_SAMPLE_BYTES
    train = itertools.takewhile(lambda p: p.split == 0, pieces("training BPE"))
    return train_bpe((p.text for i, p in enumerate(train) if i % every == 0), cfg.vocab_size)


def _write_shards(folder: Path, tokenizer: Tokenizer, pieces: Iterator[Piece]) -> dict:
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
    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.shards: list[dict] = []
        self.n_bytes = 0
        self.file = None

    def write(self, tokens: np.ndarray, piece: Piece, end_of_text: int | None) -> None:
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
        if self.file is not None:
            self.file.close()
        total = sum(s["tokens"] for s in self.shards)
        return {"shards": self.shards, "tokens": total, "bytes": self.n_bytes}


def read_pieces(sources: list[dict], split_at: int, text_field: str,
                advance: Callable[[int], None] = lambda n: None) -> Iterator[Piece]:
    """The corpus as pieces of text in order, each file or JSONL record a document; `advance`
    is told how many source bytes each piece consumed."""
    start = 0
    for source in sources:
        path = Path(source["path"])
        read = _jsonl_pieces if path.suffix == ".jsonl" else _text_pieces
        yield from read(path, split_at - start, text_field, advance)
        start += source["size"]


def _text_pieces(path: Path, cut: int, _field, advance) -> Iterator[Piece]:
    """A text file in ~1 MB pieces ending after a newline (or at the split, `cut` bytes in)."""
    position, carry, first = 0, b"", True
    with path.open("rb") as f:
        while True:
            block = f.read(PIECE_BYTES)
            data = carry + block
            if not data:
                return
            end = (data.rfind(b"\n") + 1 or len(data)) if block else len(data)
            step = -1  # a cut must not fall inside a character: move it back to the last start
            if position < cut < position + end:
                end, step = cut - position, 1  # the split; a character across it trains
            while 0 < end < len(data) and data[end] & 0xC0 == 0x80:
                end += step
            end = end or len(data)
            text = _decode(data[:end], path, position)
            yield Piece(text, end, int(position >= cut), first)
            advance(end)
            position, carry, first = position + end, data[end:], False


def _jsonl_pieces(path: Path, cut: int, field: str, advance) -> Iterator[Piece]:
    """One document per JSONL record's `field`; a record belongs to the split its line starts in."""
    position = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            start, position = position, position + len(line)
            advance(len(line))
            if not line.strip():
                continue
            try:
                record = json.loads(_decode(line, path, start))
            except json.JSONDecodeError as e:
                raise GptzooError(f"{path} line {number} is not JSON ({e.msg}); fix or delete "
                                  "that line") from e
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                keys = sorted(record)[:8] if isinstance(record, dict) else []
                keys = f" (its fields: {', '.join(keys)})" if keys else ""
                raise GptzooError(f"{path} line {number} has no text field {field!r}{keys}; set "
                                  "data.text_field to the field that holds each document")
            yield Piece(text, len(text.encode("utf-8")), int(start >= cut), True)


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptzooError(f"{path} is not UTF-8 text ({e.reason} at byte {offset + e.start}); "
                          "convert it (e.g. iconv -t UTF-8) or remove it from data.path") from e


def _replace(partial: Path, folder: Path) -> None:
    """Move the finished cache into place: a reader sees the old one, none, or the new one."""
    if folder.exists():
        stale = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        os.replace(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(partial, folder)


def _remove_abandoned(folder: Path) -> None:
    """Temporary folders of prepares that were killed (their process is gone)."""
    for path in folder.parent.glob(f"{folder.name}.*-*"):
        match = re.fullmatch(rf"{re.escape(folder.name)}\.(?:tmp|old)-(\d+)(-.*)?", path.name)
        if match and not alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


class _progress:
    """A rich progress bar (bytes, bytes/s, ETA) per pass over the corpus, on a terminal only;
    `advance(label)` starts a pass and returns its callback."""

    def __init__(self, total: int, log):
        from rich.console import Console

        self.total, self.bar = total, None
        if Console().is_terminal:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn())

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()

        def advance(label: str) -> Callable[[int], None]:
            if self.bar is None:
                return lambda n: None
            task = self.bar.add_task(label, total=self.total)
            return lambda n: self.bar.advance(task, n)

        return advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
