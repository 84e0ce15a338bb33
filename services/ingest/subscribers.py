"""The MinIO notification subscriber: decode, hand the changes to the batcher, ack once they are versioned.

A notification is acked only after the version holding its objects is pushed (or the objects were found
unchanged, or rejected), so a crash before that redelivers it. Duplicates and replays of what a version
already holds are recognised by the known objects and acked at once.
"""

from __future__ import annotations

import asyncio

from services.ingest.batcher import Batcher
from services.ingest.known import KnownObjects
from services.ingest.records import ObjectChange
from services.runtime.consumer import Delivery

__all__ = ["NotificationHandler"]


class NotificationHandler:
    def __init__(self, batcher: Batcher, known: KnownObjects, bucket: str, keepalive_s: float) -> None:
        self.batcher, self.known, self.bucket, self.keepalive_s = batcher, known, bucket, keepalive_s

    async def __call__(self, changes: list[ObjectChange], delivery: Delivery) -> None:
        waiters: list[asyncio.Future[None]] = []
        for change in changes:
            if change.bucket != self.bucket or await self._settled(change):
                continue
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.batcher.add(change, waiter)
            waiters.append(waiter)
        pending = set(waiters)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=self.keepalive_s)
            if pending:
                await delivery.in_progress()  # the batch is still waiting for its quiet window
        for waiter in waiters:
            waiter.result()  # a failed version raises here: the notification is retried

    async def _settled(self, change: ObjectChange) -> bool:
        known = await self.known.get(change.key)
        if change.kind == "removed":  # nothing to remove, unless its creation still waits in a batch
            return known is None and self.batcher.pending(change.key) is None
        return known is not None and known.etag == change.etag
