"""nanoGPT's `generate`, from its unmodified model.py (bench/third_party/nanogpt, MIT licence), with
random weights of a given shape from a prompt of character ids: bench_sample.py times this
process from start to exit against `gptzoo sample`.

    python bench/nanogpt.py --n-layer 6 --n-head 6 --n-embd 384 --block-size 256 --tokens 500
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "third_party" / "nanogpt"))
from model import GPT, GPTConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    for name, default in [("n-layer", 6), ("n-head", 6), ("n-embd", 384), ("block-size", 256),
                          ("vocab-size", 65), ("tokens", 500), ("prompt-length", 6)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    torch.manual_seed(1337)
    config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       dropout=0.0, bias=False)
    model = GPT(config).eval()
    start = time.perf_counter()
    model.generate(torch.zeros((1, args.prompt_length), dtype=torch.long), args.tokens)
    print(f"generate: {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
