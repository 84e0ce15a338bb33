"""Prometheus metrics every service exposes on ``/metrics``.

One registry per service instance (not the global one), so several services in one test process, or a
restarted app, never collide on metric names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["Metrics"]


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.consumed = Counter(
            "conveyor_events_consumed",
            "Events handled, by type and outcome (ack, retry, dead_letter)",
            ["service", "type", "outcome"],
            registry=self.registry,
        )
        self.published = Counter(
            "conveyor_events_published",
            "Events published, by type",
            ["service", "type"],
            registry=self.registry,
        )
        self.failed = Counter(
            "conveyor_events_failed",
            "Handler failures, by type and error kind (invalid, permanent, transient)",
            ["service", "type", "kind"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "conveyor_handler_seconds",
            "Handler duration in seconds, by event type",
            ["service", "type"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600),
        )
