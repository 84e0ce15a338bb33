"""The audit log of each model, on the JetStream audit stream (adapter; the entries are ``contracts.audit``).

Every entry of model M is a message on ``<prefix>.audit.M`` in the stream ``<PREFIX>_AUDIT``; its stream
sequence is its position in the log (``seq``, what ``model.promoted``'s ``transition`` names). The stream is
created with ``deny_delete`` and ``deny_purge`` (DESIGN.md "Streams"; ``contracts.names.Subjects.streams``):
the server refuses to delete or purge any message, so the log is append-only, and it has no size or age
limit. Only the registry may publish on it (its NATS permissions).

Appends are idempotent: the ``Nats-Msg-Id`` of an entry is derived from the model and the change it records
(``entry_msg_id``), so an append retried within the stream's duplicate window is dropped by JetStream and
returns the sequence of the first. ``expected_last_seq`` makes an append conditional on the model's log not
having grown since it was read (optimistic concurrency between registry replicas).
"""

from __future__ import annotations

import contextlib
import secrets
from collections import deque
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from contracts.audit import AuditEntry
from contracts.names import Subjects, event_id

__all__ = ["AuditConflict", "AuditLog", "entry_msg_id"]

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST_SEQUENCE = 10071  # JetStream's error code when the expected last sequence does not match
_FETCH_BATCH = 256


class AuditConflict(Exception):
    """The model's log grew since it was read (another replica appended first): read it again and re-plan."""


def entry_msg_id(entry: AuditEntry) -> str:
    """The ``Nats-Msg-Id`` of an entry: the model and the change it records.

    With a causing event the id depends on that cause (a redelivered event replays the same change), else on
    the entry's time (a retry resends the same entry).
    """
    return event_id(
        "audit",
        entry.model,
        entry.kind,
        entry.version,
        entry.from_stage,
        entry.to_stage,
        entry.replaced_version,
        entry.cause_event_id or entry.time.isoformat(),
    )


class AuditLog:
    """Append to and read the audit log of each model.

    ``js`` is a getter of the JetStream context (the connection exists only once the service started), e.g.
    ``AuditLog(lambda: bus.js, bus.subjects)``.
    """

    def __init__(self, js: Callable[[], JetStreamContext], subjects: Subjects) -> None:
        self.js = js
        self.subjects = subjects

    async def append(
        self,
        entry: AuditEntry,
        *,
        msg_id: str | None = None,
        expected_last_seq: int | None = None,
        timeout: float = 5.0,
    ) -> int:
        """Append ``entry`` to its model's log and return its stream sequence.

        A retried append (same ``msg_id``, by default ``entry_msg_id(entry)``) is dropped by JetStream and
        returns the first one's sequence. With ``expected_last_seq`` (from ``last_seq``), raises
        ``AuditConflict`` when the model's log has grown since by anything but this very entry.
        """
        msg_id = msg_id or entry_msg_id(entry)
        headers = {MSG_ID_HEADER: msg_id, "Content-Type": "application/json"}
        if expected_last_seq is not None:
            headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last_seq)
        try:
            ack = await self.js().publish(
                self.subjects.audit(entry.model),
                entry.model_dump_json().encode(),
                stream=self.subjects.audit_stream,
                headers=headers,
                timeout=timeout,
            )
        except APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE and expected_last_seq is not None:
                # JetStream checks the expectation before duplicates: a retry of an append that succeeded
                # finds its own message after the expected sequence.
                seq = await self._find(entry.model, msg_id, after=expected_last_seq)
                if seq is not None:
                    return seq
                raise AuditConflict(
                    f"the audit log of {entry.model} changed since sequence {expected_last_seq}: "
                    "another registry replica changed the model; read it again"
                ) from exc
            raise
        return ack.seq

    async def _find(self, model: str, msg_id: str, *, after: int) -> int | None:
        """The sequence of the model's entry with ``msg_id`` appended after sequence ``after``, if any."""
        js, seq = self.js(), after + 1
        while True:
            try:
                msg = await js.get_msg(
                    self.subjects.audit_stream, seq, subject=self.subjects.audit(model), next=True
                )
            except NotFoundError:
                return None
            if (msg.headers or {}).get(MSG_ID_HEADER) == msg_id:
                return msg.seq
            seq = (msg.seq or seq) + 1

    async def last_seq(self, model: str) -> int:
        """The stream sequence of the model's newest entry; 0 when its log is empty."""
        try:
            msg = await self.js().get_msg(self.subjects.audit_stream, subject=self.subjects.audit(model))
        except NotFoundError:
            return 0
        return msg.seq or 0

    async def history(self, model: str, limit: int | None = None) -> list[tuple[int, AuditEntry]]:
        """The model's entries, oldest first, each with its stream sequence; only the newest ``limit``.

        Reads through a short-lived pull consumer filtered on the model's subject, in batches.
        """
        if limit is not None and limit < 1:
            return []
        js = self.js()
        stream = self.subjects.audit_stream
        info = await js.add_consumer(
            stream,
            ConsumerConfig(
                name=f"audit-reader-{secrets.token_hex(8)}",
                filter_subject=self.subjects.audit(model),
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.NONE,
                mem_storage=True,
                inactive_threshold=30.0,  # the server removes it should this process die while reading
            ),
        )
        entries: deque[tuple[int, AuditEntry]] = deque(maxlen=limit)
        sub = await js.pull_subscribe_bind(info.name, stream=stream)
        try:
            remaining = info.num_pending or 0
            while remaining > 0:
                msgs = await sub.fetch(min(remaining, _FETCH_BATCH), timeout=5.0)
                for msg in msgs:
                    entry = AuditEntry.model_validate_json(msg.data)
                    entries.append((msg.metadata.sequence.stream, entry))
                remaining -= len(msgs)
        finally:
            await sub.unsubscribe()
            with contextlib.suppress(NotFoundError):
                await js.delete_consumer(stream, info.name)
        return list(entries)
