"""Prometheus metrics of the API server (own registry; served on its /metrics).

Same conventions as the Triton side (``mm_`` prefix, ``_total`` counters, ``_seconds`` histograms):

    mm_openai_requests_total{endpoint, status}       answers by HTTP status (499: client went away)
    mm_openai_request_duration_seconds{endpoint, stream}   request to last byte
    mm_openai_time_to_first_token_seconds              stream requests: request to first content chunk
    mm_openai_requests_in_flight                       requests being answered now
    mm_openai_completion_tokens_total / mm_openai_prompt_tokens_total
    mm_openai_image_fetches_total{outcome}             http(s) image URLs: ok / refused / failed
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class APIMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mm_openai_requests", "API requests answered, by HTTP status", ["endpoint", "status"], registry=r
        )
        self.duration = Histogram(
            "mm_openai_request_duration_seconds",
            "Request to last byte",
            ["endpoint", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "mm_openai_time_to_first_token_seconds",
            "Stream requests: time to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("mm_openai_requests_in_flight", "Requests being answered", registry=r)
        self.prompt_tokens = Counter("mm_openai_prompt_tokens", "Prompt tokens of answered requests", registry=r)
        self.completion_tokens = Counter("mm_openai_completion_tokens", "Tokens generated", registry=r)
        self.image_fetches = Counter(
            "mm_openai_image_fetches", "http(s) image URLs by outcome", ["outcome"], registry=r
        )
