"""The process around a service: its ASGI app (health, readiness, metrics) and how ``__main__`` runs it.

Every service's ``app.py`` builds an ``EventBus``, registers its subscribers, and returns
``build_app(bus)``; its ``__main__.py`` calls ``serve(app, settings)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import uvicorn
from faststream.asgi import AsgiFastStream, AsgiResponse, get, make_ping_asgi
from prometheus_client import make_asgi_app

from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.telemetry import get_logger

__all__ = ["build_app", "serve"]

ReadyCheck = Callable[[], Awaitable[bool]]
Hook = Callable[[], Awaitable[None]]


def build_app(
    bus: EventBus,
    *,
    ready: ReadyCheck | None = None,
    prepare: Sequence[Hook] = (),
    start: Sequence[Hook] = (),
    stop: Sequence[Hook] = (),
    http: Any = None,
) -> AsgiFastStream:
    """``/healthz`` (connected to NATS), ``/readyz`` (connected and the service's own check), ``/metrics``;
    ``http``, an ASGI app (the registry's admin API), answers every other HTTP path.

    Start-up: connect and create the streams, then the service's ``prepare`` hooks, then the consumers, then
    its ``start`` hooks (background loops). Shutdown: its ``stop`` hooks, then the consumers drain.
    """

    @get(include_in_schema=False)
    async def readyz(scope: object) -> AsgiResponse:
        ok = await bus.broker.ping(2.0) and (ready is None or await ready())
        return AsgiResponse(b"ready" if ok else b"not ready", 200 if ok else 503)

    app = _ServiceApp(
        http,
        bus.broker,
        asgi_routes=[
            ("/healthz", make_ping_asgi(bus.broker, timeout=2.0, include_in_schema=False)),
            ("/readyz", readyz),
            ("/metrics", make_asgi_app(bus.metrics.registry)),
        ],
        logger=None,
        on_startup=[bus.prepare, *prepare],  # streams exist before any durable consumer attaches
        after_startup=[bus.start_consumers, *start],
        on_shutdown=[*stop, bus.stop_consumers],
        after_shutdown=[bus.flush],
    )
    return app


class _ServiceApp(AsgiFastStream):
    """AsgiFastStream matches exact paths only; a service's own API takes the paths it does not know."""

    def __init__(self, http: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = http

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.http is not None and scope["type"] == "http":
            if all(scope["path"] != path for path, _ in self.routes):
                await self.http(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def serve(app: AsgiFastStream, settings: Settings) -> None:
    """Run the app under uvicorn on ``CONVEYOR_HTTP_PORT`` until SIGTERM."""
    get_logger().info("starting", service=settings.service, http_port=settings.http_port)
    uvicorn.run(  # log_config None: uvicorn's records go to the JSON handler of setup_logging
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        log_config=None,
        access_log=False,
    )
