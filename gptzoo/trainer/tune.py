"""`gptzoo tune-batch`: the largest micro-batch whose training step fits the device's memory.

Each candidate micro-batch compiles the real train step (one optimizer step, no accumulation)
and is kept if XLA's memory plan for it fits the budget and, when that is the device's own memory,
one step runs without running out of it. The candidates are multiples of the number of batch
shards, each predicted from the memory the earlier ones needed (`_search`).
"""

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from gptzoo.errors import GptzooError
from gptzoo.models.config import ModelConfig
from gptzoo.recipe import Recipe
from gptzoo.trainer import flops
from gptzoo.trainer.prepared import Prepared, prepare
from gptzoo.trainer.sharding import AXES, BATCH, chunk_sharded, mesh_shape


@dataclass
class Fit:
    micro_batch: int
    bytes_needed: int  # XLA's plan: arguments, outputs and temporaries, less donated buffers
    fits: bool


@dataclass
class TuneResult:
    micro_batch: int
    global_batch: int  # the recipe's trainer.batch_size
    shards: int  # data x fsdp: a micro-batch is a multiple of it
    budget_bytes: int
    bytes_needed: int
    tokens_per_sec: float
    flops_per_token: float | None
    trials: list[Fit]


def device_memory_bytes() -> int | None:
    """What the first device may allocate, where its runtime says (GPUs, TPUs); None on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def tune_batch(recipe: Recipe, budget_bytes: int | None = None, timed_steps: int = 5,
               log: Callable[[str], None] = print) -> TuneResult:
    """Bisect the micro-batch of `recipe` against `budget_bytes` (default: the device's memory,
    which a CPU does not report: pass a budget there), then time it for `timed_steps` steps."""
    on_device_memory = budget_bytes is None
    budget_bytes = budget_bytes or device_memory_bytes()
    if budget_bytes is None:
        raise GptzooError(f"{jax.devices()[0].platform} devices report no memory limit; give "
                          "tune-batch one with --memory-gb")
    sizes = dict(zip(AXES, mesh_shape(recipe.mesh, len(jax.devices())), strict=True))
    global_batch = recipe.trainer.batch_size
    shards = math.prod(sizes[axis] for axis in BATCH)  # the batch's pieces
    recipe = one_step_recipe(recipe, shards)
    p = prepare(recipe, log=lambda _: None)
    block = recipe.model.block_size
    state = _state(p)
    trials: list[Fit] = []

    def trial(micro: int) -> Fit:
        nonlocal state
        args = ((_random_batch(p, micro, block), p.train_key, np.int32(0)), *state)
        compiled = p.train_chunk.lower(*args).lowered.compile()
        needed = _bytes_needed(compiled.memory_analysis())
        fits = needed <= budget_bytes
        if fits and on_device_memory:
            try:
                state = jax.block_until_ready(p.train_chunk(*args)[:2])
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                fits, state = False, _state(_rebuilt(recipe))
        trials.append(Fit(micro, needed, fits))
        log(f"micro-batch {micro}: {_size(needed)} of {_size(budget_bytes)} -> "
            f"{'fits' if fits else 'does not fit'}")
        return trials[-1]

    # No micro-batch beyond the global batch: it could never be used.
    best = _search(trial, shards, limit=max(shards, global_batch), budget=budget_bytes)
    if best is None:
        raise GptzooError(f"not even a micro-batch of {shards} sequences of {block} tokens fits "
                          f"{_size(budget_bytes)}; shrink the model or model.block_size, "
                          "or set trainer.remat=full")
    tokens_per_sec = _time(p, state, best, block, timed_steps)
    needed = next(t.bytes_needed for t in trials if t.micro_batch == best)
    return TuneResult(best, global_batch, shards, budget_bytes, needed, tokens_per_sec,
                      _flops_per_token(recipe, p), trials)


def one_step_recipe(recipe: Recipe, micro_batch: int, grad_accum_steps: int = 1) -> Recipe:
    """A copy of `recipe` that takes one optimizer step per call, on `grad_accum_steps`
    micro-batches of `micro_batch` sequences."""
    recipe = copy.deepcopy(recipe)
    cfg = recipe.trainer
    cfg.grad_accum_steps, cfg.batch_schedule, cfg.steps_per_call = grad_accum_steps, None, 1
    cfg.batch_size = micro_batch * grad_accum_steps
    return recipe


def throughput(recipe: Recipe, micro_batch: int, steps: int = 5, grad_accum_steps: int = 1
               ) -> tuple[float, float | None]:
    """`(tokens/s, training FLOPs per token or None)` of `recipe`'s train step on micro-batches
    of `micro_batch` sequences, `grad_accum_steps` of them per optimizer step (one: what `gptzoo
    tune-batch` reports), for benchmarks."""
    recipe = one_step_recipe(recipe, micro_batch, grad_accum_steps)
    p = prepare(recipe, log=lambda _: None)
    tokens_per_sec = _time(p, _state(p), recipe.trainer.batch_size, recipe.model.block_size, steps)
    return tokens_per_sec, _flops_per_token(recipe, p)


def train_step(recipe: Recipe, micro_batch: int) -> Callable[[], Any]:
    """`_stepper` of `recipe`'s optimizer step on `micro_batch` random sequences: for
    profiling."""
    recipe = one_step_recipe(recipe, micro_batch)
    p = prepare(recipe, log=lambda _: None)
    return _stepper(p, _state(p), micro_batch, recipe.model.block_size)


def _search(trial: Callable[[int], Fit], shards: int, limit: int, budget: int) -> int | None:
    """The largest multiple of `shards` up to `limit` whose `trial` fits, assuming that fitting
    is monotone in the micro-batch.

    A trial compiles the whole train step (about 20 s for GPT-2 small on an H100), so each
    candidate is predicted from the bytes of the trials so far: XLA's plan grows about
    linearly with the micro-batch, so two trials usually place the boundary and two more confirm
    it (doubling from 1 and bisecting would take 9 + 7 trials to find 150 of 512). When a
    prediction lands on the same side of the boundary twice running, the next candidate is the
    midpoint, so a plan far from linear still takes no more trials than a bisection, plus one.
    """
    good = trial(shards)
    if not good.fits:
        return None
    previous, bad, last, same_side = None, None, good, False
    while good.micro_batch < limit and (bad is None or bad.micro_batch - good.micro_batch > shards):
        if bad is None:
            guess = _extrapolate(previous, good, budget, shards)
        elif same_side or bad.bytes_needed <= budget:  # or it ran out of memory the plan missed
            guess = (good.micro_batch + bad.micro_batch) // (2 * shards) * shards
        else:
            guess = _interpolate(good, bad, budget, shards)
        upper = limit if bad is None else bad.micro_batch - shards
        result = trial(min(max(guess, good.micro_batch + shards), upper))
        same_side, last = bad is not None and result.fits == last.fits, result
        if result.fits:
            previous, good = good, result
        else:
            bad = result
    return good.micro_batch


def _extrapolate(previous: Fit | None, good: Fit, budget: int, shards: int) -> int:
    """Where the line through the two largest fitting trials reaches the budget (doubling until
    there are two, or when the plan did not grow)."""
    if previous is None or good.bytes_needed <= previous.bytes_needed:
        return 2 * good.micro_batch
    per_sequence = (good.bytes_needed - previous.bytes_needed) / (
        good.micro_batch - previous.micro_batch)
    return _round(good.micro_batch + (budget - good.bytes_needed) / per_sequence, shards)


def _interpolate(good: Fit, bad: Fit, budget: int, shards: int) -> int:
    """Where the line between a fitting and a failing trial crosses the budget."""
    fraction = (budget - good.bytes_needed) / (bad.bytes_needed - good.bytes_needed)
    return _round(good.micro_batch + fraction * (bad.micro_batch - good.micro_batch), shards)


def _round(micro: float, shards: int) -> int:
    return int(micro) // shards * shards


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _bytes_needed(stats) -> int:
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes
            + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _state(p: Prepared):
    return p.model, p.opt_state  # placed on the mesh by prepare


def _rebuilt(recipe: Recipe) -> Prepared:
    """A fresh model and optimizer state: a step that ran out of memory may have consumed its
    donated ones."""
    return prepare(recipe, log=lambda _: None)


def _random_batch(p: Prepared, micro: int, block: int) -> jax.Array:
    """One chunk of `micro` sequences of tokens drawn uniformly from the vocabulary. Not zeros:
    a batch of one token makes the embedding's gradient (a scatter-add) write every position to
    the same row, which took a fifth of GPT-2 small's step on an H100."""
    tokens = np.random.default_rng(0).integers(0, p.tokenizer.vocab_size, (1, micro, block + 1))
    return jax.device_put(tokens.astype(np.int32), chunk_sharded(p.mesh))


def _stepper(p: Prepared, state, batch_size: int, block: int) -> Callable[[], Any]:
    """A function that dispatches one optimizer step on `batch_size` random sequences, each call
    continuing from the last, and returns the new state without waiting for it."""
    batch = _random_batch(p, batch_size, block)
    step = 0

    def one():
        nonlocal state, step
        *state, _ = p.train_chunk((batch, p.train_key, np.int32(step)), *state)
        step += 1
        return state

    return one


def _time(p: Prepared, state, batch_size: int, block: int, steps: int) -> float:
    """Tokens/s over `steps` steps dispatched back to back, as the trainer dispatches them: the
    host waits once, at the end, so the device need not wait for it between steps."""
    one = _stepper(p, state, batch_size, block)
    jax.block_until_ready(one())  # the compiled step is cached, but a shape's first run warms
    clock = time.perf_counter()
    for _ in range(steps):
        state = one()
    jax.block_until_ready(state)
    return steps * batch_size * block / (time.perf_counter() - clock)


def _flops_per_token(recipe: Recipe, p: Prepared) -> float | None:
    """The model's training FLOPs per token, when its config is a `ModelConfig`, which names the
    shape that the attention term needs (`n_layers`, `d_model`, `block_size`)."""
    m = recipe.model
    if not isinstance(m, ModelConfig):
        return None
    return flops.flops_per_token(flops.count_parameters(p.model), m.n_layers, m.d_model,
                                 m.block_size)


def report(result: TuneResult, peak_flops: float | None = None) -> list[str]:
    """The lines `gptzoo tune-batch` prints: the micro-batch, its speed and how to use it."""
    n_devices, shards = len(jax.devices()), result.shards
    lines = [f"largest micro-batch: {result.micro_batch} sequences "
             f"({_size(result.bytes_needed)} of {_size(result.budget_bytes)}), "
             f"{result.tokens_per_sec:,.0f} tokens/s"]
    peak = peak_flops or flops.known_peak_flops(jax.devices()[0])
    if peak and result.flops_per_token:
        utilisation = flops.mfu(result.tokens_per_sec, result.flops_per_token, peak, n_devices)
        lines.append(f"MFU {utilisation:.1%} of {peak / 1e12:.0f} TFLOP/s x {n_devices} device(s)")
    batch = result.global_batch
    if batch % shards == 0:  # the largest micro-batch that divides the global batch evenly
        usable = max(m for m in range(shards, result.micro_batch + 1, shards)
                     if batch % m == 0)
        lines.append(f"for trainer.batch_size={batch}: --set trainer.grad_accum_steps="
                     f"{batch // usable} (micro-batches of {usable})")
    return lines
