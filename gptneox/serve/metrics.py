"""What the server reports about its work: Prometheus metrics (GET /metrics) and the access log, one line per request.

    metrics = Metrics(engine)            # its own CollectorRegistry: several apps in one process never collide
    engine.on_end = metrics.ended        # each finished request: the latency histograms and the access log line
    metrics.count("/v1/completions", 200)  # http.py, for every /v1 request and its status
    body, content_type = metrics.scrape()

Queue depth, running slots and the token counters are read from the engine when scraped (its `stats`, `busy`,
`waiting`), so they can never drift from the engine's own counts; the latencies come from each request's
`arrival` and `token_times` when it ends. The names follow vLLM's (`vllm:` becomes `gptneox:`), so a vLLM
dashboard needs only the prefix changed. Every name: docs/serving.md, "Metrics".
"""

import logging
import time
from itertools import pairwise

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

access = logging.getLogger("gptneox.serve.access")
PREFIX = "gptneox:"  # vLLM's style (vllm:...); prometheus_client accepts ':' in names (not in label names)


def buckets(low: float, high: float) -> list[float]:
    """Histogram bounds in 1-2.5-5 steps from low to high (seconds): from one decode step of a tiny model on a CPU
    to a long request of a large one, a few buckets a decade."""
    out, decade = [], low
    while decade <= high:
        out += [b for b in (decade, 2.5 * decade, 5 * decade) if b <= high]
        decade *= 10
    return [round(b, 6) for b in out]


class EngineCollector:
    """The engine's state when scraped: running and waiting requests, token counters, the prefix-cache hit rate."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e, stats = self.engine, dict(self.engine.stats)  # a copy: the engine's thread goes on counting
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Requests in a KV-cache slot (prefilling or "
                                "decoding).", value=e.busy)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests queued for a slot.", value=len(e.waiting))
        yield CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt tokens of the requests admitted to a slot.",
                                  value=stats["prompt_tokens"])
        yield CounterMetricFamily(PREFIX + "generation_tokens", "Tokens generated.", value=stats["generated_tokens"])
        yield CounterMetricFamily(PREFIX + "prefix_cache_hits", "Prompt tokens read from the prefix cache instead of "
                                  "computed.", value=stats["cached_tokens"])
        yield GaugeMetricFamily(PREFIX + "prefix_cache_hit_rate", "prefix_cache_hits / prompt_tokens since the start "
                                "(0 before any prompt).", value=stats["cached_tokens"] / max(stats["prompt_tokens"], 1))
        yield CounterMetricFamily(PREFIX + "request_timeouts", "Requests ended by --request-timeout.",
                                  value=stats["timed_out"])


class Metrics:
    """The server's metrics in a registry of their own. count() is called on the event loop, ended() on the
    engine's thread; prometheus_client's metrics are thread-safe."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.requests = Counter(PREFIX + "http_requests", "HTTP requests to /v1 by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.finished = Counter(PREFIX + "request_finished", "Requests that ended in the engine, by finish reason "
                                "(stop, length, cancelled, error).", ["finished_reason"], registry=self.registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From a request's arrival at the engine to its "
                              "first token.", buckets=buckets(0.001, 600), registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between two consecutive tokens of a request.",
                             buckets=buckets(0.001, 10), registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From arrival to the end of a request that "
                             "finished (stop or length).", buckets=buckets(0.01, 3600), registry=self.registry)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def ended(self, r) -> None:
        """engine.on_end: r's latencies into the histograms, and its access log line."""
        now, times = time.monotonic(), r.token_times
        if times:
            self.ttft.observe(times[0] - r.arrival)
        for before, after in pairwise(times):
            self.itl.observe(after - before)
        if r.finish_reason in ("stop", "length"):
            self.e2e.observe(now - r.arrival)
        self.finished.labels(r.finish_reason).inc()
        if access.isEnabledFor(logging.INFO):
            access.info("%s", access_line(r, now))

    def scrape(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def access_line(r, now: float) -> str:
    """One request as logfmt (key=value): its id, tokens, time to first token, end-to-end time and finish reason."""
    ttft = f"{r.token_times[0] - r.arrival:.3f}" if r.token_times else "-"
    return (f"id={r.id or '-'} prompt_tokens={len(r.prompt)} cached_tokens={r.cached_tokens} "
            f"completion_tokens={len(r.tokens)} ttft_s={ttft} e2e_s={now - r.arrival:.3f} finish={r.finish_reason}")
