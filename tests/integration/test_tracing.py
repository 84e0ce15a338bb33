"""One trace follows an event across services: traceparent travels in NATS headers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from contracts.events import ModelPromoted, ModelTrained
from contracts.examples import example_event
from services.runtime.bus import EventBus
from services.runtime.consumer import Delivery

pytestmark = pytest.mark.integration


async def _two_hops(service_settings: Any, *, processors: tuple[Any, ...] = (), **overrides: Any) -> None:
    """trainer publishes model.trained -> registry returns model.promoted -> serving handles it."""
    done = asyncio.Event()
    template = example_event(ModelPromoted)

    async def registry_gate(event: ModelTrained, delivery: Delivery) -> ModelPromoted:
        return template.model_copy(update={"model": event.model, "version": event.version})

    async def serving(event: ModelPromoted, delivery: Delivery) -> None:
        done.set()

    def bus(service: str) -> EventBus:
        return EventBus(service_settings(service, **overrides), span_processors=processors)

    registry, serving_bus = bus("registry"), bus("serving")
    registry.consume(ModelTrained, registry_gate)
    serving_bus.consume(ModelPromoted, serving)
    async with registry, serving_bus, bus("trainer") as trainer:
        await trainer.publish(example_event(ModelTrained))
        await asyncio.wait_for(done.wait(), 10)


async def test_one_trace_spans_two_hops(service_settings):
    exporter = InMemorySpanExporter()
    await _two_hops(service_settings, processors=(SimpleSpanProcessor(exporter),))
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
    await _two_hops(
        service_settings,
        processors=(SimpleSpanProcessor(exporter),),
        otlp_endpoint=f"{mlflow_server.url}/v1/traces",
        otlp_headers={"x-mlflow-experiment-id": experiment_id},
    )
    trace_id = format(exporter.get_finished_spans()[0].context.trace_id, "032x")
    deadline = time.monotonic() + 30
    traces: list[Any] = []
    while time.monotonic() < deadline:
        traces = list(client.search_traces(locations=[experiment_id]))
        if traces and len(traces[0].data.spans) >= 4:
            break
        await asyncio.sleep(0.5)
    assert len(traces) == 1, "the three services' spans should merge into one MLflow trace"
    spans = traces[0].data.spans
    assert {span.trace_id for span in spans} == {traces[0].info.trace_id}
    assert trace_id in traces[0].info.trace_id
    assert sum(span.name.endswith(" process") for span in spans) == 2
