"""`GET /metrics`: the server's Prometheus metrics, in a registry of its own."""

import time

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# JAX records this for every program it lowers: a new program, compiled or read from its cache.
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)
_counters: list[Counter] = []  # the compilation counters of this process's servers


def _count_lowering(event: str, duration: float, **kwargs) -> None:
    if event == LOWERING_EVENT:
        for counter in _counters:
            counter.inc()


jax.monitoring.register_event_duration_secs_listener(_count_lowering)


class ServerMetrics:
    """Requests running and waiting, tokens in and out, time to first token and per output
    token, and the programs JAX compiled (none once the server is warm)."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.running = Gauge("gptzoo_requests_running", "Generations in a decode slot.",
                             registry=registry)
        self.waiting = Gauge("gptzoo_requests_waiting", "Generations waiting for a slot.",
                             registry=registry)
        self.prompt_tokens = Counter("gptzoo_prompt_tokens", "Prompt tokens prefilled.",
                                     registry=registry)
        self.generation_tokens = Counter("gptzoo_generation_tokens", "Tokens generated.",
                                         registry=registry)
        self.first_token = Histogram(
            "gptzoo_time_to_first_token_seconds", "From a request's arrival to its first token.",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.per_token = Histogram(
            "gptzoo_time_per_output_token_seconds",
            "Between a generation's deliveries, per token delivered.",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.compilations = Counter(
            "gptzoo_compilations", "Programs JAX traced and compiled (or read from its cache).",
            registry=registry)
        _counters.append(self.compilations)

    def queues(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def prompt(self, n_tokens: int) -> None:
        self.prompt_tokens.inc(n_tokens)

    def tokens(self, job, n_tokens: int) -> None:
        """`n_tokens` of `job` are going out now (before `job.deliver` records the time)."""
        now = time.perf_counter()
        self.generation_tokens.inc(n_tokens)
        if job.last_delivery is None:
            self.first_token.observe(now - job.created)
        elif n_tokens:
            self.per_token.observe((now - job.last_delivery) / n_tokens)

    def text(self) -> bytes:
        return generate_latest(self.registry)
