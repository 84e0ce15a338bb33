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

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import nats
from faststream.nats import NatsBroker
from faststream.security import SASLPlaintext
from nats.aio.client import Client
from nats.errors import AuthorizationError, NoServersError
from nats.errors import Error as NatsError
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

__all__ = ["EventBus", "NatsUnreachable", "connect_once", "make_broker", "publish_once"]

E = TypeVar("E", bound=Event)
T = TypeVar("T")

MSG_ID_HEADER = "Nats-Msg-Id"  # JetStream's de-duplication header (nats.js.api.Header.MSG_ID)


class NatsUnreachable(ConnectionError):
    """A command's one try at NATS failed (``connect_once``); the message says what to do next."""

    def __init__(self, settings: Settings, cause: BaseException) -> None:
        if _refused_login(cause):
            advice = f"it refused the user {settings.nats_user!r}: check CONVEYOR_NATS_USER and _PASSWORD"
        else:
            advice = "is the stack up? Try `conveyor up`, or point CONVEYOR_NATS_URL at your NATS"
        reason = str(cause) or type(cause).__name__
        super().__init__(f"cannot reach NATS at {settings.nats_url} ({reason}): {advice}")


def _refused_login(exc: BaseException) -> bool:
    # nats-py raises a plain nats.errors.Error for the server's -ERR at connect, AuthorizationError later.
    return isinstance(exc, AuthorizationError) or "Authorization Violation" in str(exc)


class _Tries:
    """The error callback of a command's connection. nats-py's default logs a traceback for every failed
    try; a command's failed try is raised to it instead (``NatsUnreachable``), naming the last try's error
    rather than the "no servers available" that follows it. Other errors (a permissions violation) are
    still logged."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    async def note(self, exc: Exception) -> None:
        self.errors.append(exc)
        if not (isinstance(exc, OSError | asyncio.TimeoutError) or _refused_login(exc)):
            logging.getLogger("nats").error("%s", exc)

    def options(self) -> dict[str, Any]:
        """``nats.connect`` keywords: one try at NATS, at once; nats-py's own default retries forever, and
        ``max_reconnect_attempts=0`` means that too."""
        return {
            "allow_reconnect": False,
            "connect_timeout": 3,
            "max_reconnect_attempts": 1,  # the first connect tries each server this many times more
            "reconnect_time_wait": 0.2,
            "error_cb": self.note,  # nats-py wants a coroutine function
        }

    def unreachable(self, settings: Settings, exc: BaseException) -> NatsUnreachable:
        cause = self.errors[-1] if isinstance(exc, NoServersError) and self.errors else exc
        return NatsUnreachable(settings, cause)


_CONNECT_ERRORS = (OSError, TimeoutError, NatsError)


async def connect_once(settings: Settings) -> Client:
    """A nats-py connection for one command (the CLI, a check): one try, ``NatsUnreachable`` when it
    fails."""
    tries = _Tries()
    try:
        return await nats.connect(**settings.nats_connect_kwargs(), **tries.options())
    except _CONNECT_ERRORS as exc:
        raise tries.unreachable(settings, exc) from exc


async def publish_once(settings: Settings, event: Event) -> PubAck:
    """Publish one event as a command (the CLI's ``train``, ``canary-verdict``): ``NatsUnreachable`` when
    NATS does not answer the one try."""
    async with EventBus(settings.model_copy(update={"service": "cli"}), once=True) as bus:
        return await bus.publish(event)


def make_broker(settings: Settings, **kwargs: Any) -> NatsBroker:
    """A NatsBroker for ``settings``: credentials, client name, no per-message logging, and reconnects
    forever unless ``kwargs`` say otherwise (the keywords of ``nats.connect``)."""
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
        **{"max_reconnect_attempts": -1, **kwargs},
    )


class EventBus:
    """One service's connection to the bus. Build it once; tests build one per simulated service."""

    def __init__(
        self,
        settings: Settings,
        *,
        span_processors: Sequence[SpanProcessor] = (),
        metrics: Metrics | None = None,
        once: bool = False,
    ) -> None:
        """``once``: for a command, one try at NATS and ``NatsUnreachable`` (a service waits for NATS)."""
        self.settings = settings
        self._tries = _Tries() if once else None
        self.subjects = settings.subjects
        self.metrics = metrics or Metrics()
        self.tracer_provider = setup_tracing(settings, *span_processors)
        self.tracer = self.tracer_provider.get_tracer("conveyor.bus")
        self.broker = make_broker(settings, **(self._tries.options() if self._tries else {}))
        self.source = f"conveyor/{settings.service}"
        self._consumers: list[tuple[Consumer[Any], str, str, int]] = []
        self._pulls: list[PullConsumer] = []

    async def prepare(self) -> None:
        """Connect and check that the streams and KV buckets exist (before any durable consumer attaches):
        their configuration is the admin user's to set (``services.runtime.streams``); a missing one is
        created where this user may, else ``NotProvisioned`` says how to provision them."""
        try:
            await self.broker.connect()
        except _CONNECT_ERRORS as exc:
            if self._tries:
                raise self._tries.unreachable(self.settings, exc) from exc
            raise
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
