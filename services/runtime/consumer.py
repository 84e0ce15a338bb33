"""One durable consumer: decode, call the domain handler, publish what it returns, then ack.

The error policy of DESIGN.md lives here and only here (see ``errors.py`` for the tree):
an invalid message or a permanent error goes to dead letters at once with the reason; anything else is nak'd
with an exponential delay, and dead-lettered once ``max_deliveries`` deliveries have failed. A message whose
delivery count is already past the limit (the handler crashed the process on each try) is dead-lettered
before the handler runs again.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from nats.aio.msg import Msg
from opentelemetry import propagate, trace

from contracts.envelope import EnvelopeHead, Event, decode
from services.runtime.deadletters import dead_letter
from services.runtime.errors import Outcome, TransientError, classify
from services.runtime.telemetry import current_event_id, get_logger

if TYPE_CHECKING:
    from services.runtime.bus import EventBus

__all__ = ["Consumer", "Decoder", "Delivery", "Handler", "event_decoder", "kept_alive"]

E = TypeVar("E", bound=Event)
T = TypeVar("T")


@dataclass
class Delivery:
    """What a handler may want besides the event: its envelope and delivery, and a keep-alive."""

    envelope: EnvelopeHead | None  # None for messages that are not CloudEvents (MinIO notifications)
    subject: str
    num_delivered: int
    stream_seq: int
    message: Msg

    async def in_progress(self) -> None:
        """Tell JetStream the work goes on, so a long handler's message is not redelivered meanwhile."""
        await self.message.in_progress()


async def kept_alive(work: Awaitable[T], delivery: Delivery, every_s: float) -> T:
    """Await ``work``, telling JetStream every ``every_s`` that it goes on, so a long handler (a training, a
    gate, a Triton load) does not get its message redelivered meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every_s)
            if done:
                return task.result()
            await delivery.in_progress()
    finally:
        task.cancel()


HandlerResult = Event | Sequence[Event] | None
Handler = Callable[[T, Delivery], Awaitable[HandlerResult]]
Decoder = Callable[[bytes], tuple[EnvelopeHead | None, T]]


def event_decoder(event_cls: type[E]) -> Decoder[E]:
    """The decoder of CloudEvents of one type (upcasting older versions)."""
    return functools.partial(decode, expected=event_cls)


class Consumer(Generic[T]):
    """Handles the messages of one durable consumer.

    ``decoder`` turns the message body into what the handler takes (for events: ``contracts.decode``); it
    raises ``InvalidEvent`` for a message that can never be handled. ``type_label`` names the messages in
    metrics (the event type).
    """

    def __init__(
        self,
        bus: EventBus,
        type_label: str,
        decoder: Decoder[T],
        handler: Handler[T],
        durable: str,
    ) -> None:
        self.bus = bus
        self.type_label = type_label
        self.decoder = decoder
        self.handler = handler
        self.durable = durable
        self.settings = bus.settings
        self.log = get_logger(service=bus.settings.service, consumer=durable)
        self.tracer = bus.tracer_provider.get_tracer("conveyor.consumer")

    def backoff(self, num_delivered: int, exc: BaseException) -> float:
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            return exc.retry_after
        delay = self.settings.retry_base_delay_s * 2 ** (num_delivered - 1)
        return float(min(delay, self.settings.retry_max_delay_s))

    async def __call__(self, message: Msg) -> None:
        headers = message.headers or {}
        delivered = message.metadata.num_delivered
        event_type = self.type_label
        token = current_event_id.set(headers.get("Nats-Msg-Id"))
        started = time.perf_counter()
        span = self.tracer.start_as_current_span(
            f"{message.subject} process",
            context=propagate.extract(headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": message.subject,
                "messaging.message.id": headers.get("Nats-Msg-Id", ""),
                "messaging.consumer.group.name": self.durable,
                "conveyor.delivery": delivered,
            },
        )
        try:
            with span:
                outcome = await self._handle(message, delivered)
        finally:
            current_event_id.reset(token)
        metrics = self.bus.metrics
        service = self.settings.service
        metrics.consumed.labels(service, event_type, outcome.value).inc()
        metrics.duration.labels(service, event_type).observe(time.perf_counter() - started)

    async def _handle(self, raw: Msg, delivered: int) -> Outcome:
        max_deliveries = self.settings.max_deliveries
        if delivered > max_deliveries:
            reason = (
                f"delivered {delivered} times without an ack (the handler crashed or timed out each time)"
            )
            return await self._dead_letter(raw, reason, "exhausted")
        try:
            envelope, event = self.decoder(raw.data)
            delivery = Delivery(envelope, raw.subject, delivered, raw.metadata.sequence.stream, raw)
            result = await self.handler(event, delivery)
            for out in _as_list(result):
                await self.bus.publish(out)
        except Exception as exc:
            kind = classify(exc)
            self.bus.metrics.failed.labels(self.settings.service, self.type_label, kind).inc()
            reason = f"{type(exc).__name__}: {exc}"
            if kind != "transient":
                return await self._dead_letter(raw, reason, kind)
            if delivered >= max_deliveries:
                return await self._dead_letter(raw, f"failed {delivered} deliveries; last: {reason}", kind)
            delay = self.backoff(delivered, exc)
            self.log.warning("handler failed, retrying", error=reason, delivered=delivered, retry_in_s=delay)
            await raw.nak(delay=delay)
            return Outcome.RETRY
        await raw.ack()
        return Outcome.ACK

    async def _dead_letter(self, raw: Msg, reason: str, kind: str) -> Outcome:
        try:
            await dead_letter(self.bus, raw, consumer=self.durable, reason=reason, kind=kind)
        except Exception as exc:  # the DLQ itself failed: keep the message, try again later
            self.log.error("could not dead-letter, will retry", error=repr(exc), reason=reason)
            await raw.nak(delay=self.settings.retry_max_delay_s)
            return Outcome.RETRY
        self.log.error("dead-lettered", reason=reason, kind=kind, subject=raw.subject)
        await raw.term()  # JetStream will not redeliver it
        return Outcome.DEAD_LETTER


def _as_list(result: HandlerResult) -> Sequence[Any]:
    if result is None:
        return ()
    if isinstance(result, Event):
        return (result,)
    return result
