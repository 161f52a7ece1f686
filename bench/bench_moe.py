"""A Mixtral-style train step against a dense model with the same active parameters per token,
and how the routed tokens spread over the experts.

    python bench/bench_moe.py [--quick] [--layers 4] [--d-model 128] [--experts 4] [--top-k 2]

Both models are LLaMA-style (RMSNorm, rotary attention, SwiGLU, untied head) and differ only in
their feed-forward: the mixture's `MoEBlock`s hold `--experts` experts of width `d_hidden` and send
each token through `--top-k` of them, the dense model's `Block`s one SwiGLU of width
`top_k * d_hidden`, so both multiply each token by as many weights. A step is the loss (plus the
load-balancing loss at Mixtral's coefficient for the mixture), its gradient and an AdamW update,
jitted; the mixture runs on each expert path ("blocks", "dense", "ragged"), in interleaved rounds
with the dense model, and the ratio printed is the median of the rounds' ratios (load that comes
and goes cancels within a round). The goal on a CPU: the default path ("blocks" there at this
size) at most 1.5x the dense step.
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptzoo import nn
from gptzoo.nn.experts import expert_path
from gptzoo.nn.stack import run_blocks, stack_blocks

VOCAB = 65  # characters, as char_shakespeare
AUX_LOSS_COEF = 0.02  # Mixtral's router_aux_loss_coef
PATHS = ("blocks", "dense", "ragged")


class TinyLM(eqx.Module):
    embedding: nn.Embedding
    blocks: eqx.Module
    final_norm: nn.RMSNorm
    head: nn.Linear

    def __call__(self, tokens):
        """Logits and the blocks' summed router statistics (None for dense blocks)."""
        out = run_blocks(self.blocks, self.embedding(tokens))
        x, stats = out if isinstance(out, tuple) else (out, None)
        return self.head(self.final_norm(x), out_dtype=jnp.float32), stats


def build(args, path: str | None) -> TinyLM:
    """The mixture on expert path `path`, or the dense model for None."""
    d, heads = args.d_model, args.d_model // 32
    keys = jax.random.split(jax.random.PRNGKey(0), args.layers + 2)

    def block(key):
        attn_key, mlp_key = jax.random.split(key)
        attention = nn.CausalSelfAttention(d, heads, positional=nn.Rotary(d // heads),
                                           use_bias=False, key=attn_key)
        if path is None:
            return nn.Block(nn.RMSNorm(d), attention, nn.RMSNorm(d), nn.GLUMLP(
                d, d_hidden=args.top_k * args.d_hidden, use_bias=False, key=mlp_key))
        return nn.MoEBlock(nn.RMSNorm(d), attention, nn.RMSNorm(d), nn.MoEMLP(
            d, n_experts=args.experts, top_k=args.top_k, d_hidden=args.d_hidden, path=path,
            key=mlp_key))

    return TinyLM(nn.Embedding(VOCAB, d, key=keys[0]),
                  stack_blocks([block(k) for k in keys[2:]]), nn.RMSNorm(d),
                  nn.Linear(d, VOCAB, use_bias=False, key=keys[1]))


def loss_fn(model: TinyLM, batch):
    logits, stats = model(batch[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    return loss if stats is None else loss + AUX_LOSS_COEF * nn.load_balancing_loss(stats)


def step_timer(model: TinyLM, batch):
    """`run() -> seconds` of one jitted train step (loss, gradient, AdamW update)."""
    optimizer = optax.adamw(3e-4)
    state = [model, optimizer.init(eqx.filter(model, eqx.is_inexact_array))]

    @eqx.filter_jit(donate="all-except-first")
    def step(batch, model, opt_state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, batch)
        updates, opt_state = optimizer.update(grads, opt_state,
                                              eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    def run() -> float:
        clock = time.perf_counter()
        state[:] = jax.block_until_ready(step(batch, *state))[:2]
        return time.perf_counter() - clock

    return run


def tokens_per_expert(model: TinyLM, batch) -> np.ndarray:
    """Token choices each expert got, per layer (averaged over the layers), at initialisation."""
    _, stats = eqx.filter_jit(model)(batch[:, :-1])
    return np.asarray(stats.expert_counts) / len(model.blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-hidden", type=int, default=176, help="each expert's hidden width "
                        "(default: half of LLaMA's 352 for 128 wide, so top-2 is one LLaMA MLP)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 steps")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 2
    batch = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq + 1), 0, VOCAB)
    print(f"{jax.devices()[0].platform}: {args.layers} layers x {args.d_model}, "
          f"{args.experts} experts of {args.d_hidden} (top {args.top_k}) against one SwiGLU of "
          f"{args.top_k * args.d_hidden}; {args.batch} x {args.seq} tokens per step; expert "
          f"path by default here: "
          f"{expert_path('auto', args.batch * args.seq * args.top_k, args.experts)}")

    counts = tokens_per_expert(build(args, "auto"), batch)
    print(f"token choices per expert per layer: {', '.join(f'{c:.0f}' for c in counts)} "
          f"(even: {args.batch * args.seq * args.top_k / args.experts:.0f})")

    timers = {"dense model": step_timer(build(args, None), batch)}
    timers.update({f"mixture, {p}": step_timer(build(args, p), batch) for p in PATHS})
    for run in timers.values():  # compile and warm up
        run(), run()
    times = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, run in timers.items():
            times[name].append(statistics.median(run() for _ in range(args.steps)))
    dense = np.array(times["dense model"])
    for name, seconds in times.items():
        ratio = statistics.median(np.array(seconds) / dense)
        print(f"{name:>18}: {1e3 * statistics.median(seconds):8.1f} ms per step, "
              f"{ratio:.2f}x the dense model's")


if __name__ == "__main__":
    main()
