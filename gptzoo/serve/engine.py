"""Continuous batching: one thread owns the device and a fixed number of decode slots.

Requests wait in a bounded queue; between decode chunks the thread takes the waiting ones into
free slots and re-encodes the generations whose window is full (the sampler's default context
shift: keep the last half, at positions 0..), prefilling the prompts and shifts of one length
bucket together; then it decodes one chunk of every slot at once, and hands each job its new
tokens. A job that finishes, or whose client has gone, leaves its slot at that boundary. Every
program compiles in `warm_up`, so no request waits on a compilation.
"""

import logging
import statistics
import threading
import time
from collections import deque

import jax
import numpy as np

from gptzoo.nn.rowwise import rowwise_pays
from gptzoo.sample import BUCKET, CHUNK
from gptzoo.serve.job import Job, Prefill, Row, Sampling
from gptzoo.serve.programs import (
    decode_chunk,
    decoding_forms,
    empty_slots,
    prefill,
    seed_key,
    vocab_size,
    widths,
)

log = logging.getLogger(__name__)

TIMING_ROUNDS, TIMING_STEPS = 5, 4  # warm-up times each form's chunks of 4 steps, 5 times
PREFILL_TOKENS = 256  # most padded tokens a prefill of several rows holds
KEEP = 0.5  # the fraction of the window a context shift keeps (`gptzoo sample`'s default)


class QueueFull(Exception):
    """More jobs than the free slots and the queue's room."""


def prefill_buckets(block_size: int, n_keep: int) -> list[int]:
    """The padded prompt lengths that compile: `BUCKET` doubled up to the window, and the
    length a context shift re-encodes."""
    buckets, bucket = {block_size, n_keep}, BUCKET
    while bucket < block_size:
        buckets.add(bucket)
        bucket *= 2
    return sorted(buckets)


class Engine:
    """The device thread and its slots.

    **Arguments:**

    - `model`: a model with a KV cache (`init_cache`, `decode`, `block_size`).
    - `n_slots`: how many generations decode at once.
    - `max_queue`: how many jobs may wait for a slot; `submit` refuses more.
    - `metrics`: a `ServerMetrics` told of tokens and queue lengths, or None.
    """

    def __init__(self, model, n_slots: int, max_queue: int, metrics=None):
        # Prefills read `few`; each decode width reads whichever form warm-up found faster.
        self.few, self.many = decoding_forms(model, n_slots)
        self.widths = widths(n_slots)
        self.forms = {width: self.few for width in self.widths}
        self.chosen: dict[int, str] = {}  # the form warm-up timed faster, by width
        self.block_size = model.block_size
        self.n_keep = max(1, int(KEEP * self.block_size))
        self.buckets = prefill_buckets(self.block_size, self.n_keep)
        self.vocab = vocab_size(model)
        self.n_slots, self.max_queue, self.metrics = n_slots, max_queue, metrics
        self.slots = empty_slots(self.few, n_slots)
        self.rows: list[Row | None] = [None] * n_slots
        self.waiting: deque[Job] = deque()
        self.starting: set[int] = set()  # slots taken for jobs whose prefill is under way
        self.wake = threading.Condition()
        self.ready = threading.Event()
        self.stopping = False
        self.failure: str | None = None  # why warm-up failed
        self.thread = threading.Thread(target=self._run, name="gptzoo-engine", daemon=True)

    def start(self) -> None:
        """Warm up, then serve, on the engine's thread."""
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` (all or none: `QueueFull` when they do not fit)."""
        with self.wake:
            running = sum(row is not None or slot in self.starting
                          for slot, row in enumerate(self.rows))
            if running + len(self.waiting) + len(jobs) > self.n_slots + self.max_queue:
                raise QueueFull
            self.waiting.extend(jobs)
            self.wake.notify()

    def warm_up(self) -> None:
        """Compile every program the engine runs: the prefill of each bucket and number of rows
        (one row with the prompt's scores), and the decode chunk of each width; each twice, the
        second time on the outputs of the first, as requests will run them."""
        key = np.asarray(seed_key(np.int32(0)))
        for _ in range(2):
            for bucket in self.buckets:
                tokens = np.zeros(bucket, np.int32)
                self._prefill([Prefill(0, tokens, key, 0, Sampling(), echo=True)])
                for width in self._prefill_widths(bucket):
                    self._prefill([Prefill(0, tokens, key, 0, Sampling())] * width)
            for width in self.widths:
                for form in self._forms_for(width):
                    self._decode_chunk(np.ones(width, np.int32), form)
        self._choose_forms()

    def _forms_for(self, width: int) -> tuple:
        """The forms a decode chunk of `width` rows may read (the plain one first)."""
        return ((self.few,) if not rowwise_pays(width) or self.many is self.few
                else (self.few, self.many))

    def _choose_forms(self) -> None:
        """Decode each width the rowwise layout may serve (`rowwise_pays`) with the faster of
        the model's two forms on this machine (`rowwise_layout` pays off for large weights
        only), timed over interleaved short chunks."""
        for width in (w for w in self.widths if len(self._forms_for(w)) > 1):
            times: list[list[float]] = [[], []]
            for _ in range(TIMING_ROUNDS):
                for form, form_times in zip(self._forms_for(width), times, strict=True):
                    start = time.perf_counter()
                    self._decode_chunk(np.full(width, TIMING_STEPS, np.int32), form)
                    form_times.append(time.perf_counter() - start)
            faster = min((0, 1), key=lambda i: statistics.median(times[i]))
            self.forms[width] = self._forms_for(width)[faster]
            self.chosen[width] = ("plain", "row-wise")[faster]

    def _run(self) -> None:
        try:
            self.warm_up()
        except Exception as e:  # noqa: BLE001 - reported by /health and every request
            log.exception("compiling the programs failed")
            self.failure = f"{type(e).__name__}: {e}"
            return
        self.ready.set()
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.stopping or self.waiting or any(self.rows))
                if self.stopping:
                    return
                self._drop_cancelled()
                starting = [(slot, self.waiting.popleft()) for slot, row in enumerate(self.rows)
                            if row is None and self.waiting]
                # Neither waiting nor in a row while they prefill, yet `submit` must count them.
                self.starting = {slot for slot, _ in starting}
            try:
                self._step(starting)
            except Exception as e:  # noqa: BLE001 - the server outlives a failed step
                log.exception("decoding failed; the requests in progress end with an error")
                self._fail_all(f"decoding failed: {type(e).__name__}: {e}")
            with self.wake:
                self.starting = set()
            if self.metrics is not None:
                self.metrics.queues(sum(row is not None for row in self.rows), len(self.waiting))

    def _drop_cancelled(self) -> None:
        self.rows = [None if row is None or row.job.cancelled else row for row in self.rows]
        self.waiting = deque(job for job in self.waiting if not job.cancelled)

    def _step(self, starting: list[tuple[int, Job]]) -> None:
        """Prefill the new jobs' prompts and the full windows' shifts, then decode a chunk."""
        prefills = [p for slot, job in starting if (p := self._start(slot, job))]
        prefills += [self._shift(slot, row) for slot, row in enumerate(self.rows)
                     if row is not None and row.position >= self.block_size]
        groups = [[p] for p in prefills if p.echo]  # scored one at a time: rarely batched
        plain = [p for p in prefills if not p.echo]
        for bucket in sorted({self._bucket(len(p.tokens)) for p in plain}):
            same = [p for p in plain if self._bucket(len(p.tokens)) == bucket]
            most = self._prefill_widths(bucket)[-1]
            groups += [same[i:i + most] for i in range(0, len(same), most)]
        for group in groups:
            for prefill_, result in zip(group, self._prefill(group), strict=True):
                self._finish(prefill_, *result)
        if any(self.rows):
            self._decode()

    def _start(self, slot: int, job: Job) -> Prefill | None:
        """A new job's prefill, None when it samples nothing and scores nothing."""
        if self.metrics is not None:
            self.metrics.prompt(len(job.prompt))
        if job.max_tokens == 0 and not job.echo:
            job.deliver([])
            return None
        key = np.asarray(seed_key(np.int32(job.sampling.seed)))
        return Prefill(slot, np.asarray(job.prompt, np.int32), key, 0, job.sampling, job.echo,
                       job=job)

    def _shift(self, slot: int, row: Row) -> Prefill:
        """Re-encoding a full window's last `n_keep` tokens at positions 0.. (then one sample)."""
        kept = np.asarray(row.context[-self.n_keep:], np.int32)
        return Prefill(slot, kept, row.key, row.t, row.job.sampling, row=row)

    def _finish(self, prefill_: Prefill, token: int, info: tuple,
                prompt_infos: list[tuple] | None) -> None:
        """Put a prefill's generation in its slot and deliver its first token."""
        slot, row, job = prefill_.slot, prefill_.row, prefill_.job
        if row is None:  # a new job
            if job.max_tokens == 0:  # scored only
                job.deliver([], None, prompt_infos)
                return
            row = Row(job, len(prefill_.tokens), job.max_tokens, 0, prefill_.key, [])
            self.rows[slot] = row
        row.position, row.t, row.remaining = len(prefill_.tokens), row.t + 1, row.remaining - 1
        row.context = [*prefill_.tokens.tolist(), token]
        self._deliver(slot, row, [token], [info], prompt_infos)

    def _decode(self) -> None:
        n_steps = np.zeros(self.n_slots, np.int32)
        for slot, row in enumerate(self.rows):
            if row is not None:
                n_steps[slot] = min(CHUNK, row.remaining, self.block_size - row.position)
        tokens, infos = self._decode_chunk(n_steps)
        for slot, (row, n) in enumerate(zip(self.rows, n_steps, strict=True)):
            if row is None or n == 0:
                continue
            new = tokens[slot, :n].tolist()
            row.position, row.t, row.remaining = row.position + n, row.t + n, row.remaining - n
            row.context = [*row.context, *new][-self.block_size:]
            self._deliver(slot, row, new, _info_rows(infos, slot, n) if row.job.logprobs else None)

    def _deliver(self, slot: int, row: Row, tokens: list[int], infos: list[tuple] | None,
                 prompt_infos: list[tuple] | None = None) -> None:
        if self.metrics is not None:
            self.metrics.tokens(row.job, len(tokens))
        if row.job.deliver(tokens, infos if row.job.logprobs else None, prompt_infos):
            self.rows[slot] = None

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _prefill_widths(self, bucket: int) -> list[int]:
        """How many rows a prefill program of `bucket` tokens may hold: up to `PREFILL_TOKENS`
        in all (longer prompts gain little from sharing a program, and every program costs
        warm-up time)."""
        return [w for w in self.widths if w == 1 or w * bucket <= PREFILL_TOKENS]

    def _prefill(self, prefills: list[Prefill]) -> list[tuple[int, tuple, list | None]]:
        """Run prefills of one bucket in one program of `widths` rows (padding rows write no
        slot; `echo` is the first one's): each one's sampled token, its info row, and with
        echo the prompt's info rows."""
        width = next(w for w in self.widths if w >= len(prefills))  # within _prefill_widths
        nowhere = Prefill(self.n_slots, prefills[0].tokens[:1], prefills[0].key, 0,
                          Sampling(temperature=0))
        rows = prefills + [nowhere] * (width - len(prefills))
        padded = np.zeros((width, self._bucket(max(len(p.tokens) for p in rows))), np.int32)
        for i, p in enumerate(rows):
            padded[i, :len(p.tokens)] = p.tokens
        settings = (np.float32([p.sampling.temperature for p in rows]),
                    np.int32([p.sampling.top_k or self.vocab for p in rows]),
                    np.float32([p.sampling.top_p or 1.0 for p in rows]))
        lengths = np.int32([len(p.tokens) for p in rows])
        self.slots, token, info, prompt = prefill(
            self.few, self.slots, np.int32([p.slot for p in rows]), padded, lengths,
            np.stack([p.key for p in rows]), np.int32([p.t for p in rows]), settings,
            prefills[0].echo)
        token, info, prompt = jax.device_get((token, info, prompt))
        return [(int(token[i]), (float(info[0][i]), info[1][i], info[2][i]),
                 None if prompt is None else _info_rows(prompt, i, lengths[i] - 1))
                for i in range(len(prefills))]

    def _decode_chunk(self, n_steps: np.ndarray, form=None):
        """Decode the narrowest prefix of the slots that holds every slot with steps to take
        (new jobs take the lowest free slot, so the busy ones stay near the front), reading the
        model in `form` (default: the width's chosen form)."""
        busy = np.flatnonzero(n_steps)
        width = next(w for w in self.widths if w > (busy[-1] if len(busy) else 0))
        model = self.forms[width] if form is None else form
        self.slots, tokens, infos = decode_chunk(model, self.slots, n_steps[:width], self.vocab)
        return jax.device_get((tokens, infos))

    def _fail_all(self, message: str) -> None:
        with self.wake:
            jobs = [row.job for row in self.rows if row is not None] + list(self.waiting)
            self.rows, self.waiting = [None] * self.n_slots, deque()
        for job in jobs:
            job.fail(message)
        self.slots = empty_slots(self.few, self.n_slots)  # a failed call may have used them


def _info_rows(info, slot: int | None, n: int) -> list[tuple]:
    """`TokenInfo` arrays (of one slot's chunk, or of a prompt) as n `(logprob, top_ids,
    top_logprobs)` tuples."""
    logprob, top_ids, top_logprobs = (x if slot is None else x[slot] for x in info)
    return list(zip(logprob[:n].tolist(), top_ids[:n], top_logprobs[:n], strict=True))
