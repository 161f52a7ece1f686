"""Memory of the output head and its loss, whole and in chunks (`trainer.head_chunk`), at GPT-2's
vocabulary of 50,304 and a batch of 8 x 1,024 tokens of width 768: the loss and its gradients
for the hidden states and the head, compiled and run once, each variant in a process of its own.
Prints XLA's scratch memory of the compiled program and the process's peak resident memory, and
the seconds of one call.

    python bench/bench_head_chunk.py [--chunks 0 128 512] [--batch 8] [--seq 1024]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

VOCAB, WIDTH = 50_304, 768


def one(chunk: int, batch: int, seq: int) -> dict:
    import jax
    import jax.numpy as jnp

    from gptzoo.trainer.loss import cross_entropy, head_cross_entropy

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    hidden = jax.random.normal(keys[0], (batch, seq, WIDTH))
    weight = 0.02 * jax.random.normal(keys[1], (VOCAB, WIDTH))
    labels = jax.random.randint(keys[2], (batch, seq), 0, VOCAB)

    def loss(h, w):
        if chunk:
            return head_cross_entropy(h, w, labels, chunk).mean()
        return cross_entropy(jnp.einsum("bsd,vd->bsv", h, w), labels).mean()

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, weight).compile()
    jax.block_until_ready(compiled(hidden, weight))
    clock = time.perf_counter()
    jax.block_until_ready(compiled(hidden, weight))
    seconds = time.perf_counter() - clock
    return {"scratch_mb": compiled.memory_analysis().temp_size_in_bytes / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 128, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        return print(json.dumps(one(args.one, args.batch, args.seq)))
    logits_mib = args.batch * args.seq * VOCAB * 4 / 2**20
    print(f"head + cross-entropy, loss and gradients: batch {args.batch} x {args.seq}, width "
          f"{WIDTH}, vocabulary {VOCAB:,}; float32 logits {logits_mib:,.0f} MiB")
    for chunk in args.chunks:
        out = subprocess.run([sys.executable, __file__, "--one", str(chunk), "--batch",
                              str(args.batch), "--seq", str(args.seq)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"head_chunk={chunk}: XLA scratch {row['scratch_mb']:,.0f} MiB, peak RSS "
              f"{row['peak_rss_mb']:,.0f} MiB, {row['seconds']:.2f} s a call", flush=True)


if __name__ == "__main__":
    main()
