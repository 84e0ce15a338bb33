"""Dead letters: publish one, list them, replay one (``conveyor dlq list`` / ``conveyor dlq replay``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from contracts.deadletter import DeadLetter
from contracts.names import Subjects

if TYPE_CHECKING:
    from services.runtime.bus import EventBus

__all__ = ["StoredDeadLetter", "dead_letter", "list_dead_letters", "replay"]

MSG_ID = "Nats-Msg-Id"
# Headers JetStream sets itself or that must not travel back with a replay.
_DROP_ON_REPLAY = {MSG_ID, "Nats-Expected-Stream", "Nats-Expected-Last-Sequence"}


async def dead_letter(bus: EventBus, msg: Msg, *, consumer: str, reason: str, kind: str) -> None:
    """Publish ``msg`` to this service's dead-letter subject with the reason (deduplicated per original)."""
    meta = msg.metadata
    headers = dict(msg.headers or {})
    payload, encoding = DeadLetter.wrap_payload(msg.data)
    record = DeadLetter(
        service=bus.settings.service,
        consumer=consumer,
        reason=reason,
        kind=kind,
        subject=msg.subject,
        stream=meta.stream,
        stream_seq=meta.sequence.stream,
        num_delivered=meta.num_delivered,
        failed_at=datetime.now(UTC),
        event_id=headers.get(MSG_ID),
        headers=headers,
        payload=payload,
        payload_encoding=encoding,
    )
    subject = bus.subjects.dlq(bus.settings.service)
    await bus.js.publish(
        subject,
        record.model_dump_json().encode(),
        stream=bus.subjects.dlq_stream,
        headers={
            MSG_ID: f"dlq:{consumer}:{meta.stream}:{meta.sequence.stream}",
            "Conveyor-Reason": reason[:200],
        },
    )


@dataclass
class StoredDeadLetter:
    id: int  # its sequence in the dead-letter stream: what `conveyor dlq replay ID` takes
    record: DeadLetter


async def list_dead_letters(
    js: JetStreamContext, subjects: Subjects, limit: int = 100
) -> list[StoredDeadLetter]:
    """The newest ``limit`` dead letters still held (replayed ones are removed)."""
    info = await js.stream_info(subjects.dlq_stream)
    out: list[StoredDeadLetter] = []
    seq = info.state.last_seq
    while seq >= max(info.state.first_seq, 1) and len(out) < limit:
        try:
            raw = await js.get_msg(subjects.dlq_stream, seq)
        except NotFoundError:  # a gap left by a replay
            seq -= 1
            continue
        out.append(StoredDeadLetter(seq, DeadLetter.model_validate_json(raw.data or b"{}")))
        seq -= 1
    return out


async def replay(js: JetStreamContext, subjects: Subjects, dlq_id: int) -> dict[str, Any]:
    """Send dead letter ``dlq_id`` back to its original subject, then remove it from the dead letters.

    The replay gets a new message id (the original one may still be in the duplicate window); consumers
    dedupe on business keys, so a consumer that had handled it already does no harm.
    """
    try:
        raw = await js.get_msg(subjects.dlq_stream, dlq_id)
    except NotFoundError:
        raise LookupError(f"no dead letter {dlq_id}: `conveyor dlq list` shows the ones held") from None
    record = DeadLetter.model_validate_json(raw.data or b"{}")
    headers = {k: v for k, v in record.headers.items() if k not in _DROP_ON_REPLAY}
    headers[MSG_ID] = f"replay:{dlq_id}:{record.event_id or record.stream_seq}"
    headers["Conveyor-Replayed-From"] = str(dlq_id)
    ack = await js.publish(record.subject, record.original_payload(), headers=headers)
    await js.delete_msg(subjects.dlq_stream, dlq_id)
    return {"dead_letter": dlq_id, "subject": record.subject, "stream": ack.stream, "seq": ack.seq}
