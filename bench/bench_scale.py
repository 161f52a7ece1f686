"""Scale check: generate a corpus of many files (2 GB by default), `gptzoo prepare` it with a
byte-level BPE, train a small model a few hundred steps on it, and print the peak RSS of those
processes, prepare's MB/s and raw `tokenizers` `encode_batch` MB/s on the same text.

    python bench/bench_scale.py [--gb 2] [--steps 300] [--dir DIR] [--quick]

The issue's bar: peak RSS under 1.5 GB. The corpus is written once into DIR (default a folder
under the system temp dir) and reused by later runs of the same size.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gptzoo.data import SHAKESPEARE, HFTokenizer, train_bpe
from gptzoo.data.shards import BATCH_BYTES
from gptzoo.data.sources import PIECE_BYTES

ROOT = Path(__file__).resolve().parents[1]
FILE_BYTES = 64 << 20
BLOCK_WORDS = 12 * 100_000  # words drawn at a time: 100,000 lines, ~30 MB of table rows


def generate(folder: Path, n_bytes: int) -> None:
    """Files of Shakespeare's words drawn with their frequencies, one line every 12 words.

    Vectorised (a Python join per line took minutes for 2 GB): each word is a row of a byte table,
    padded with zeros and ending in its separator; the drawn rows, zeros dropped, are the text."""
    # Drawing uniformly from the text's word occurrences draws each word with its frequency.
    words, occurrences = np.unique(SHAKESPEARE.read_text().split(), return_inverse=True)
    encoded = [w.encode() for w in words]
    table = np.zeros((len(words), max(map(len, encoded)) + 1), np.uint8)
    for row, word in zip(table, encoded, strict=True):
        row[:len(word)] = np.frombuffer(word, np.uint8)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(-(-n_bytes // FILE_BYTES)):
        path = folder / f"part{i:04d}.txt"
        if path.exists():
            continue
        size = min(FILE_BYTES, n_bytes - i * FILE_BYTES)
        with path.with_suffix(".tmp").open("wb") as f:
            while f.tell() < size:
                rows = table[occurrences[rng.integers(len(occurrences), size=BLOCK_WORDS)]]
                rows[:, -1] = ord(" ")
                rows[11::12, -1] = ord("\n")
                text = rows[rows != 0].tobytes()
                f.write(text[:size - f.tell()])
        path.with_suffix(".tmp").rename(path)


def raw_encode_mb_per_s(folder: Path, tokenizer: HFTokenizer, limit: int) -> float:
    """`encode_batch` alone on the corpus's first `limit` bytes, in prepare's piece sizes."""
    seconds = done = 0
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text()
        pieces = [text[i:i + PIECE_BYTES] for i in range(0, len(text), PIECE_BYTES)]
        per_call = max(BATCH_BYTES // PIECE_BYTES, 1)
        for i in range(0, len(pieces), per_call):
            clock = time.perf_counter()
            tokenizer.tokenizer.encode_batch_fast(pieces[i:i + per_call], add_special_tokens=False)
            seconds += time.perf_counter() - clock
        done += len(text)
        if done >= limit:
            break
    return done / 1e6 / seconds


def gptzoo(*args: str) -> str:
    command = [sys.executable, "-m", "gptzoo", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "gptzoo_scale")
    parser.add_argument("--quick", action="store_true", help="20 MB, 20 steps (a smoke test)")
    args, ignored = parser.parse_known_args()  # nox -s bench passes the other scripts' options
    if ignored:
        print(f"bench_scale.py ignores {' '.join(ignored)}")
    gb, steps = (0.02, 20) if args.quick else (args.gb, args.steps)
    corpus = args.dir / f"corpus_{gb:g}gb"
    clock = time.perf_counter()
    generate(corpus, int(gb * 1e9))
    print(f"corpus: {corpus} ({gb:g} GB in {len(list(corpus.glob('*.txt')))} files), "
          f"generated or found in {time.perf_counter() - clock:.0f}s")
    tokenizer_dir = args.dir / "bpe1024"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    text = SHAKESPEARE.read_text()
    tokenizer = train_bpe(iter([text]), 1024)
    tokenizer.save(tokenizer_dir)

    settings = ["--set", f"data.path={corpus}", "--set",
                f"data.tokenizer={tokenizer_dir / 'tokenizer.json'}",
                "--set", f"data.cache_dir={args.dir / 'cache'}", "--set", "data.val_fraction=0.001"]
    recipe = str(ROOT / "recipes" / "char_shakespeare.py")
    clock = time.perf_counter()
    prepared = gptzoo("prepare", recipe, *settings)
    prepare_seconds = time.perf_counter() - clock
    cache = Path(re.search(r"cache (\S+)", prepared).group(1))
    manifest = json.loads((cache / "manifest.json").read_text())
    gptzoo("train", recipe, *settings, "--set", f"trainer.max_steps={steps}",
           "--set", f"trainer.eval_interval={steps}", "--set", "trainer.eval_steps=2",
           "--set", f"trainer.checkpoint_interval={steps}", "--set", "model.n_layers=2",
           "--run-dir", str(args.dir / "run"))
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    raw = raw_encode_mb_per_s(corpus, tokenizer, limit=min(int(gb * 1e9), 256 << 20))
    print(prepared.strip())
    print(f"prepare: {manifest['mb_per_s']:.1f} MB/s tokenising ({prepare_seconds:.0f}s for the "
          f"whole command); raw tokenizers encode_batch: {raw:.1f} MB/s on the same text")
    print(f"peak RSS of the prepare and train processes: {peak_mb:,.0f} MB (bar: 1,536 MB)")
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at the end (other "
          "programs on the machine lower both MB/s figures alike)")


if __name__ == "__main__":
    main()
