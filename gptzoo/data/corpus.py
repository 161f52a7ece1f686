"""Corpora: documents from a text file, a folder, a glob or JSONL files (`gptzoo.data.sources`),
tokenised once into a cache folder of token shards (`gptzoo.data.shards`) that training reads
through memory maps.

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

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptzoo.data.shards import SPLITS, TokenSplit, shard_dtype, write_shards
from gptzoo.data.sources import Piece, find_sources, read_pieces
from gptzoo.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    OutOfVocabulary,
    Tokenizer,
    load_tokenizer_file,
    tokenizer_hash,
    train_bpe,
)
from gptzoo.errors import GptzooError
from gptzoo.processes import alive

FORMAT = 1  # bump when the cache layout changes: older caches are then rebuilt
# A BPE learns its merges from at most this much training text, pieces taken evenly through the
# split: merges settle long before that, and counting words of gigabytes takes many minutes.
BPE_SAMPLE_BYTES = 64 << 20


@dataclass
class Corpus:
    """A prepared corpus.

    **Arguments:**

    - `folder`: its cache folder.
    - `tokenizer`: the tokenizer its shards were written with.
    - `train`, `val`: the two splits' tokens.
    - `manifest`: the folder's `manifest.json`.
    """

    folder: Path
    tokenizer: Tokenizer
    train: TokenSplit
    val: TokenSplit
    manifest: dict


def prepare_corpus(cfg, tokenizer: Tokenizer | None = None,
                   log: Callable[[str], None] = print) -> Corpus:
    """The token shards of the corpus `cfg` (a `DataConfig`) describes: reused from the cache
    while its sources and tokenizer are unchanged, else built. `tokenizer` (a checkpoint's)
    forces that tokenizer rather than fitting one: the corpus the recipe's own cache holds when
    that is the tokenizer it has (a run's eval or resume), else one cached apart."""
    sources = find_sources(cfg)
    folder = cache_folder(cfg)
    wanted = tokenizer or _given_tokenizer(cfg)
    corpus = _open_cached(folder, cfg, sources, wanted)
    if corpus is not None:
        return corpus
    if tokenizer is not None:
        folder = cache_folder(cfg, tokenizer)
        corpus = _open_cached(folder, cfg, sources, wanted)
        if corpus is not None:
            return corpus
    _build(folder, cfg, sources, wanted, log)
    return _open_cached(folder, cfg, sources, wanted)


def cache_folder(cfg, forced: Tokenizer | None = None) -> Path:
    """Where the corpus `cfg` describes is cached: named after `data.path`, keyed by every
    setting that changes its shards, and by the tokenizer `forced` on it (a checkpoint's), so
    that a corpus tokenized for another run never stands in for one fitted to its own text."""
    root = Path(cfg.cache_dir or os.environ.get("GPTZOO_CACHE") or "~/.cache/gptzoo").expanduser()
    tokenizer = cfg.tokenizer
    if tokenizer not in ("char", "bytes", "bpe"):
        tokenizer = str(Path(tokenizer).expanduser().absolute())
    key = {"path": str(Path(cfg.path).expanduser().absolute()), "text_field": cfg.text_field,
           "tokenizer": tokenizer, "val_fraction": cfg.val_fraction,
           "vocab_size": cfg.vocab_size if tokenizer == "bpe" else None}
    if forced is not None:
        key["forced"] = tokenizer_hash(forced)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.-]+", "_", Path(cfg.path).stem or "corpus").strip("_") or "corpus"
    return root / f"{name}-{digest}"


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
            try:
                splits = write_shards(partial, tokenizer, pieces("tokenising"))
            except OutOfVocabulary as e:
                raise GptzooError(f"data.path={cfg.path}: {e}, or set data.tokenizer (now "
                                  f"{cfg.tokenizer}) to one that has them") from e
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
