"""Prometheus metrics, one registry per app so that tests can run several apps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        running = Gauge("qwenserve_requests_running", "Requests in the running batch", registry=r)
        running.set_function(lambda: engine.running_count)
        waiting = Gauge("qwenserve_requests_waiting", "Requests waiting for a batch slot", registry=r)
        waiting.set_function(lambda: engine.waiting_count)
        self.requests = Counter("qwenserve_requests", "Chat completion requests accepted", ["stream"], registry=r)
        self.ttft = Histogram("qwenserve_time_to_first_token_seconds", "Submission to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("qwenserve_e2e_request_latency_seconds", "Submission to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qwenserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("qwenserve_generation_tokens", "Tokens generated", registry=r)
        self.cancellations = Counter("qwenserve_cancellations", "Generations cancelled", registry=r)
        self.resumes = Counter("qwenserve_resumes", "Streams resumed with Last-Event-ID or a known session",
                               registry=r)
        self.rejected = Counter("qwenserve_rejected", "Requests refused with 429", registry=r)
        # Several replicas on one store: what this replica took, lost and was told by the others.
        self.takeovers = Counter("qwenserve_sessions_taken_over", "Sessions this replica took over from "
                                 "another (its producer died or handed it over)", registry=r)
        self.fenced_appends = Counter("qwenserve_fenced_appends", "Appends refused by the lease fence "
                                      "(another replica produces the session now); the generation stopped",
                                      registry=r)
        self.remote_cancels = Counter("qwenserve_cross_replica_cancels", "Generations on this replica "
                                      "cancelled by a request that reached another replica", registry=r)
        engine.on_first_token = self.ttft.observe
        engine.on_finished = self.finished
        engine.on_rejected = self.rejected.inc

    def finished(self, reason: str, latency_seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        """Called by the inference thread (prometheus-client is thread-safe)."""
        if reason == "cancelled":
            self.cancellations.inc()
        self.latency.observe(latency_seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
