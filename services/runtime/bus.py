"""The event bus of one service: a faststream NatsBroker, publishing of typed events, and consumers.

``EventBus`` is what a service's ``app.py`` builds once and hands to its subscribers::

    bus = EventBus(settings)
    bus.consume(DatasetVersioned, trainer.on_dataset_versioned)   # returns the events to publish
    await bus.start()
    await bus.publish(ModelTrained(...))

faststream's NatsBroker holds the connection; publishing injects ``traceparent`` with OpenTelemetry;
consumers are ``pull.PullConsumer`` loops that hand each raw message to ``consumer.Consumer``, which decodes
and validates with ``contracts`` so a bad message becomes a dead letter with its reason.

Publishing wraps the event in its CloudEvents envelope and sends ``Nats-Msg-Id`` = event id (JetStream drops a
duplicate publish) and the W3C ``traceparent``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from faststream.nats import NatsBroker
from faststream.security import SASLPlaintext
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, PubAck
from opentelemetry import propagate
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import SpanKind

from contracts.envelope import Event, encode
from contracts.names import durable_name, inbox_prefix
from services.runtime.config import Settings
from services.runtime.consumer import Consumer, Decoder, Handler, event_decoder
from services.runtime.metrics import Metrics
from services.runtime.pull import PullConsumer, ensure_consumer
from services.runtime.streams import ensure_streams
from services.runtime.telemetry import setup_tracing

__all__ = ["EventBus", "make_broker"]

E = TypeVar("E", bound=Event)
T = TypeVar("T")

MSG_ID_HEADER = "Nats-Msg-Id"  # JetStream's de-duplication header (nats.js.api.Header.MSG_ID)


def make_broker(settings: Settings, **kwargs: Any) -> NatsBroker:
    """A NatsBroker for ``settings``: credentials, client name, reconnects forever, no per-message logging."""
    security = None
    if settings.nats_user:
        password = settings.nats_password.get_secret_value() if settings.nats_password else ""
        security = SASLPlaintext(username=settings.nats_user, password=password)
    return NatsBroker(
        settings.nats_url,
        name=f"conveyor-{settings.service}",
        security=security,
        inbox_prefix=inbox_prefix(settings.nats_user),
        apply_types=False,
        logger=kwargs.pop("logger", None),
        max_reconnect_attempts=-1,
        **kwargs,
    )


class EventBus:
    """One service's connection to the bus. Build it once; tests build one per simulated service."""

    def __init__(
        self,
        settings: Settings,
        *,
        span_processors: Sequence[SpanProcessor] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.subjects = settings.subjects
        self.metrics = metrics or Metrics()
        self.tracer_provider = setup_tracing(settings, *span_processors)
        self.tracer = self.tracer_provider.get_tracer("conveyor.bus")
        self.broker = make_broker(settings)
        self.source = f"conveyor/{settings.service}"
        self._consumers: list[tuple[Consumer[Any], str, str, int]] = []
        self._pulls: list[PullConsumer] = []

    async def prepare(self) -> None:
        """Connect and check that the streams and KV buckets exist (before any durable consumer attaches):
        their configuration is the admin user's to set (``services.runtime.streams``); a missing one is
        created where this user may, else ``NotProvisioned`` says how to provision them."""
        await self.broker.connect()
        await ensure_streams(
            self.js,
            self.subjects,
            inference_max_bytes=self.settings.inference_max_bytes,
            inference_max_age_s=self.settings.inference_max_age_s,
            update=False,
        )

    async def start(self) -> None:
        """Prepare, then start the consumers."""
        await self.prepare()
        await self.broker.start()
        await self.start_consumers()

    async def stop(self) -> None:
        await self.stop_consumers()
        await self.broker.stop()
        self.flush()

    def flush(self) -> None:
        self.tracer_provider.force_flush(5000)

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def js(self) -> JetStreamContext:
        """The nats-py JetStream context of the connected broker (KV, stream info)."""
        return self.broker.config.connection_state.stream

    @property
    def nc(self) -> Client:
        return self.broker.config.connection_state.connection

    async def publish(self, event: Event, *, timeout: float = 5.0) -> PubAck:
        """Publish one event to its subject and stream.

        ``PubAck.duplicate`` is true when JetStream dropped it as a duplicate of an earlier publish. This goes
        straight to nats-py rather than through faststream's publisher, whose middleware chain cost more than
        the rest of the path together (bench/bus.py).
        """
        event_id, body = encode(event, self.source)
        subject = self.subjects.event(event.type, event.subject_name())
        with self.tracer.start_as_current_span(
            f"{subject} publish",
            kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.destination.name": subject},
        ):
            headers = {MSG_ID_HEADER: event_id, "Content-Type": "application/cloudevents+json"}
            propagate.inject(headers)
            ack = await self.js.publish(
                subject, body, stream=self.subjects.stream_for(subject), headers=headers, timeout=timeout
            )
        self.metrics.published.labels(self.settings.service, event.type).inc()
        return ack

    def consume(
        self,
        event_cls: type[E],
        handler: Handler[E],
        *,
        name: str = "*",
        durable: str | None = None,
        max_in_flight: int = 16,
    ) -> Consumer[E]:
        """Register a durable pull consumer of ``event_cls`` events (every name by default).

        Replicas of a service share the durable, so they share the work. ``max_in_flight`` bounds how many
        messages one replica handles at once (1 for one-at-a-time work such as training). Consumers start
        with ``start()``.
        """
        durable = durable or durable_name(self.settings.service, event_cls.type)
        consumer = Consumer(self, event_cls.type, event_decoder(event_cls), handler, durable)
        subject = self.subjects.event_filter(event_cls.type, name)
        self._consumers.append((consumer, self.subjects.stream_for(subject), subject, max_in_flight))
        return consumer

    def consume_raw(
        self,
        stream: str,
        subject: str,
        decoder: Decoder[T],
        handler: Handler[T],
        *,
        durable: str,
        type_label: str,
        max_in_flight: int = 16,
    ) -> Consumer[T]:
        """A durable consumer of messages that are not Conveyor events (e.g. MinIO's notifications), with
        the same ack, retry and dead-letter policy; ``decoder`` raises ``InvalidEvent`` for a bad one."""
        consumer = Consumer(self, type_label, decoder, handler, durable)
        self._consumers.append((consumer, stream, subject, max_in_flight))
        return consumer

    async def start_consumers(self) -> None:
        for consumer, stream, subject, max_in_flight in self._consumers:
            config = ConsumerConfig(
                durable_name=consumer.durable,
                filter_subject=subject,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.settings.ack_wait_s,
                max_deliver=-1,  # the consumer dead-letters after max_deliveries itself
                max_ack_pending=max(1000, max_in_flight),
            )
            await ensure_consumer(self.js, stream, config)
            pull = PullConsumer(self.nc, stream, consumer.durable, consumer, max_in_flight=max_in_flight)
            await pull.start()
            self._pulls.append(pull)

    async def stop_consumers(self) -> None:
        for pull in self._pulls:
            await pull.stop()
        self._pulls.clear()
