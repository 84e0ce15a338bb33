"""A service process exposes health, readiness and Prometheus metrics while it consumes."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import uvicorn

from contracts.events import ModelTrained
from contracts.examples import example_event
from services.runtime.bus import EventBus
from services.runtime.consumer import Delivery
from services.runtime.service import build_app
from tests.servers import free_port, wait_until_ok

pytestmark = pytest.mark.integration


async def test_health_readiness_and_metrics(service_settings):
    handled = asyncio.Event()

    async def handler(event: ModelTrained, delivery: Delivery) -> None:
        handled.set()

    port = free_port()
    bus = EventBus(service_settings("registry"))
    bus.consume(ModelTrained, handler)
    server = uvicorn.Server(uvicorn.Config(build_app(bus), host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await wait_until_ok(http, "/readyz", seconds=10)
            assert (await http.get("/healthz")).status_code == 204
            async with EventBus(service_settings("trainer")) as trainer:
                await trainer.publish(example_event(ModelTrained))
            await asyncio.wait_for(handled.wait(), 10)
            await asyncio.sleep(0.1)
            metrics = (await http.get("/metrics")).text
        acked = 'conveyor_events_consumed_total{outcome="ack",service="registry",type="model.trained"} 1.0'
        assert acked in metrics
        assert "conveyor_handler_seconds_bucket" in metrics
    finally:
        server.should_exit = True
        await serving
