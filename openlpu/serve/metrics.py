"""Prometheus metrics, one CollectorRegistry per app (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Bucket edges in seconds: a 270M model on a CPU ranges from ms per token to seconds per request.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServeMetrics:
    def __init__(self, scheduler_state):
        """scheduler_state: an object with queue_depth and active_count (read at scrape time)."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("openlpu_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("openlpu_prompt_tokens", "Prompt tokens of requests whose prefill finished",
                                     registry=r)
        self.completion_tokens = Counter("openlpu_completion_tokens", "Completion tokens generated",
                                         registry=r)
        queue = Gauge("openlpu_queue_depth", "Requests waiting for a batch slot", registry=r)
        queue.set_function(lambda: scheduler_state.queue_depth)
        active = Gauge("openlpu_active_sequences", "Sequences in the running batch", registry=r)
        active.set_function(lambda: scheduler_state.active_count)
        self.queue_time = Histogram("openlpu_queue_time_seconds", "Time waiting for a batch slot",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram("openlpu_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.inter_token = Histogram("openlpu_inter_token_seconds", "Mean gap between tokens, per request",
                                     buckets=LATENCY_BUCKETS_S, registry=r)
        self.request_latency = Histogram("openlpu_request_seconds", "Arrival to last token",
                                         buckets=LATENCY_BUCKETS_S, registry=r)
        self.step_time = Histogram("openlpu_engine_step_seconds", "One batched engine step",
                                   buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("openlpu_engine_batch_size", "Sequences per engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def observe_step(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.step_time.observe(seconds)

    def observe_job(self, job, completion_tokens: int, prompt_tokens: int) -> None:
        self.completion_tokens.inc(completion_tokens)
        self.queue_time.observe(job.queue_time_s)
        if job.first_token_s is not None:  # not a request dropped in the queue or during its prefill
            self.prompt_tokens.inc(prompt_tokens)
            self.ttft.observe(job.first_token_s - job.enqueued_s)
            if job.finished_s is not None:
                self.request_latency.observe(job.finished_s - job.enqueued_s)
        if completion_tokens > 1 and job.finished_s is not None:  # a stream dropped midway has no end to time
            self.inter_token.observe(job.completion_time_s / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
