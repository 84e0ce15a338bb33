"""Builds the monitor service from settings: one place that wires every dependency (tests pass their own).

Consumes ``inference.logged`` (a durable pull consumer: each message is a batch of samples, handled one at a
time); a background task closes windows by time and judges due canaries every ``monitor_tick_s``.
Publishes ``drift.detected``, ``drift.cleared`` and ``canary.verdict`` through an outbox: the monitor's KV
state records a verdict or drift before its event goes out, so an event whose publish failed is kept and sent
again on the next tick (its id is derived from its key, so a resend is never a duplicate) rather than lost
with the acked samples that caused it.

Before the consumer starts, ``recover`` reads back what it acked last time, as far back as the longest window
of any policy, and ``Monitor.replay`` puts the samples no closed window holds back into the windows: a restart
loses none. With several replicas, each reads back every replica's share (their windows overlap for a while).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from faststream.asgi import AsgiFastStream
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from contracts.envelope import Event, InvalidEvent, decode
from contracts.events import InferenceLogged
from contracts.kv import DriftPolicy, ModelPolicy
from services.monitor.config import MonitorSettings
from services.monitor.metrics import MonitorMetrics
from services.monitor.monitor import Monitor
from services.monitor.profiles import MlflowProfiles, Profiles, ProfileSource
from services.monitor.state import MonitorState
from services.runtime.bus import EventBus
from services.runtime.consumer import Delivery
from services.runtime.policy import Policies
from services.runtime.pull import read_through
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
        self.consumer = self.bus.consume(InferenceLogged, self.on_inference_logged, max_in_flight=1)

    async def recover(self) -> None:
        """Rebuild the windows open at the last stop from the inference stream (``Monitor.replay``): the
        messages the durable consumer acked, back to the longest window any policy allows. Should that
        fail, the monitor starts with empty windows, as it did before there was a replay."""
        try:
            await self._recover()
        except Exception as exc:
            self.log.warning("windows not rebuilt after the restart", error=repr(exc))

    async def _recover(self) -> None:
        js, stream = self.bus.js, self.settings.subjects.inference_stream
        try:
            floor = (await js.consumer_info(stream, self.consumer.durable)).ack_floor
        except NotFoundError:
            return  # the first start: the consumer will deliver every message
        if floor is None or not floor.stream_seq:
            return
        policies = [
            ModelPolicy.model_validate_json(v) for v in (await self.monitor.policies.current()).values()
        ]
        longest = max([DriftPolicy().window_seconds, *(p.drift.window_seconds for p in policies)])
        until = floor.last_active or datetime.now(UTC)
        since = until - timedelta(seconds=longest + 2 * self.settings.monitor_tick_s)
        subject = self.settings.subjects.event_filter(InferenceLogged.type, "*")
        began = time.monotonic()
        self.outbox += await self.monitor.replay(_read_back(js, stream, subject, since, floor.stream_seq))
        self.log.info(
            "windows rebuilt after a restart",
            read_back_from=since.isoformat(),
            seconds=round(time.monotonic() - began, 2),
            windows={f"{m}@{v}": w.count for (m, v), w in self.monitor.windows.items()},
        )

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


async def _read_back(
    js: JetStreamContext, stream: str, subject: str, since: datetime, last: int
) -> AsyncIterator[InferenceLogged]:
    """The events of ``subject`` from ``since`` up to stream sequence ``last``, oldest first; a message that
    does not decode was dead-lettered by the consumer: skipped."""
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
    async with contextlib.aclosing(read_through(js, stream, subject, config, batch=256)) as messages:
        async for msg in messages:
            if msg.metadata.sequence.stream > last:
                return  # aclosing: the consumer is deleted now, not when the generator is collected
            with contextlib.suppress(InvalidEvent):
                yield decode(msg.data, InferenceLogged)[1]


def build(
    settings: MonitorSettings | None = None, source: ProfileSource | None = None
) -> tuple[AsgiFastStream, MonitorService]:
    s = settings or MonitorSettings()
    service = MonitorService(s, EventBus(s), source or MlflowProfiles(s.mlflow_url, s.cache_dir))

    async def ready() -> bool:
        return service.ready

    app = build_app(
        service.bus, ready=ready, prepare=[service.recover], start=[service.start], stop=[service.stop]
    )
    return app, service
