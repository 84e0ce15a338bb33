"""One trace follows an event across services: traceparent travels in NATS headers."""

from __future__ import annotations

import time
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.flows import assert_one_mlflow_trace, two_hops

pytestmark = pytest.mark.integration


async def test_one_trace_spans_two_hops(service_settings):
    exporter = InMemorySpanExporter()
    await two_hops(service_settings, [SimpleSpanProcessor(exporter)])
    spans = exporter.get_finished_spans()
    by_service: dict[str, list[Any]] = {}
    for span in spans:
        by_service.setdefault(span.resource.attributes["service.name"], []).append(span)
    assert set(by_service) == {"trainer", "registry", "serving"}
    assert len({span.context.trace_id for span in spans}) == 1, [s.name for s in spans]
    process = {s.resource.attributes["service.name"]: s for s in spans if s.name.endswith(" process")}
    assert process["registry"].parent is not None and process["serving"].parent is not None
    # serving's span descends from registry's: the second hop continued the same trace
    registry_span_ids = {s.context.span_id for s in by_service["registry"]}
    assert process["serving"].parent.span_id in registry_span_ids


async def test_trace_reaches_mlflow_trace_store(service_settings, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = client.create_experiment(f"traces-{time.time_ns()}")
    exporter = InMemorySpanExporter()
    otlp = {
        "otlp_endpoint": f"{mlflow_server.url}/v1/traces",
        "otlp_headers": {"x-mlflow-experiment-id": experiment_id},
    }
    await two_hops(lambda service: service_settings(service, **otlp), [SimpleSpanProcessor(exporter)])
    trace_id = format(exporter.get_finished_spans()[0].context.trace_id, "032x")
    await assert_one_mlflow_trace(client, experiment_id, trace_id)
