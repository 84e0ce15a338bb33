"""Builds the monitor service from settings: one place that wires every dependency (tests pass their own).

Consumes ``inference.logged`` (a durable pull consumer: each message is a batch of samples, handled one at a
time); a background task closes windows by time and judges due canaries every ``monitor_tick_s``.
Publishes ``drift.detected``, ``drift.cleared`` and ``canary.verdict`` through an outbox: the monitor's KV
state records a verdict or drift before its event goes out, so an event whose publish failed is kept and sent
again on the next tick (its id is derived from its key, so a resend is never a duplicate) rather than lost
with the acked samples that caused it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from faststream.asgi import AsgiFastStream

from contracts.envelope import Event
from contracts.events import InferenceLogged
from services.monitor.config import MonitorSettings
from services.monitor.metrics import MonitorMetrics
from services.monitor.monitor import Monitor
from services.monitor.profiles import MlflowProfiles, Profiles, ProfileSource
from services.monitor.state import MonitorState
from services.runtime.bus import EventBus
from services.runtime.consumer import Delivery
from services.runtime.policy import Policies
from services.runtime.rollouts import Rollouts
from services.runtime.service import build_app
from services.runtime.tasks import cancel
from services.runtime.telemetry import get_logger

__all__ = ["MonitorService", "build"]


@dataclass
class MonitorService:
    settings: MonitorSettings
    bus: EventBus
    source: ProfileSource
    monitor: Monitor = field(init=False)
    ready: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        s, js = self.settings, lambda: self.bus.js
        self.log = get_logger(service=s.service)
        self.monitor = Monitor(
            Profiles(self.source, max_versions=s.monitor_max_versions),
            Policies(js, s.subjects.kv.policy),
            Rollouts(js, s.subjects.kv.rollout),
            MonitorState(js, s.subjects.kv.monitor),
            MonitorMetrics(self.bus.metrics.registry),
            embedding_sample=s.monitor_embedding_sample,
            permutations=s.monitor_permutations,
            max_versions=s.monitor_max_versions,
            history=s.monitor_history,
            log_to_mlflow=s.monitor_log_to_mlflow,
        )
        self._ticking: asyncio.Task[None] | None = None
        self.outbox: list[Event] = []
        # One batch at a time: the windows are shared, and a batch is cheap next to a window's tests.
        self.bus.consume(InferenceLogged, self.on_inference_logged, max_in_flight=1)

    async def on_inference_logged(self, event: InferenceLogged, delivery: Delivery) -> None:
        self.outbox += await self.monitor.on_inference_logged(event)
        await self.send()

    async def send(self) -> None:
        """Publish the outbox in order; what fails stays for the next tick."""
        while self.outbox:
            try:
                await self.bus.publish(self.outbox[0])
            except Exception as exc:  # NATS away for a moment: the next tick sends it
                self.log.warning("event not sent yet", type=self.outbox[0].type, error=repr(exc))
                return
            self.outbox.pop(0)

    async def start(self) -> None:
        self._ticking = asyncio.create_task(self._tick_forever())
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await cancel(self._ticking)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.monitor_tick_s)
            try:
                self.outbox += await self.monitor.tick()
                await self.send()
            except Exception as exc:  # NATS or MLflow away for a moment: next tick
                self.log.warning("monitor tick failed", error=repr(exc))


def build(
    settings: MonitorSettings | None = None, source: ProfileSource | None = None
) -> tuple[AsgiFastStream, MonitorService]:
    s = settings or MonitorSettings()
    service = MonitorService(s, EventBus(s), source or MlflowProfiles(s.mlflow_url, s.cache_dir))

    async def ready() -> bool:
        return service.ready

    app = build_app(service.bus, ready=ready, start=[service.start], stop=[service.stop])
    return app, service
