"""A corpus's sources: the files `data.path` names, read in order as pieces of documents, each
piece in the split its bytes fall in."""

import glob
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptzoo.errors import GptzooError

PIECE_BYTES = 1 << 20  # text files are read and encoded in ~1 MB pieces, cut after a newline


@dataclass
class Piece:
    """A run of one document's text that lies in one split.

    **Arguments:**

    - `text`: the text.
    - `n_bytes`: its size in the source, in bytes.
    - `split`: 0 (training) or 1 (validation).
    - `new_document`: whether it starts a document.
    """

    text: str
    n_bytes: int
    split: int  # index into gptzoo.data.shards.SPLITS
    new_document: bool


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
            # After the last newline; in a block without one (a line over PIECE_BYTES), before
            # its last byte, which the loop below moves back to the start of its character.
            end = (data.rfind(b"\n") + 1 or len(data) - 1) if block else len(data)
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
