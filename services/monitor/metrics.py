"""The monitor's Prometheus metrics, per model version (and per test for the drift statistics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["MonitorMetrics"]


class MonitorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples = Counter(
            "conveyor_monitor_samples",
            "Inference samples read, by version and ok",
            ["model", "version", "ok"],
            registry=registry,
        )
        self.statistic = Gauge(
            "conveyor_drift_statistic",
            "The latest closed window's statistic per drift test (psi.*, ks.*, mmd.embedding)",
            ["model", "version", "test"],
            registry=registry,
        )
        self.drifted = Gauge(
            "conveyor_drift_detected",
            "1 when the latest closed window drifted",
            ["model", "version"],
            registry=registry,
        )
        self.live_accuracy = Gauge(
            "conveyor_live_accuracy",
            "Accuracy on the latest window's feedback labels",
            ["model", "version"],
            registry=registry,
        )
        self.verdicts = Counter(
            "conveyor_canary_verdicts",
            "Canary verdicts given, by verdict",
            ["model", "verdict"],
            registry=registry,
        )
