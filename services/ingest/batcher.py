"""Arrivals collected per dataset until a quiet window passes or the batch is full; then one version.

Pure bookkeeping with an injected clock: the ingest loop asks ``due()`` for closed batches. A change may come
with a future (a MinIO notification waiting for its ack); it is resolved once its batch is versioned, so a
notification is acked only after the version that includes it exists, and a crash loses nothing.

Notifications arrive as they happen, so quiet is measured to now. A poller sees arrivals only when a listing
runs, so it reports the start of each listing it finished (``observed``) and quiet is measured to there: a
batch closes only after a listing that began ``quiet_s`` past its last arrival found nothing new (the poller
starts one then: ``quiet_ends``). Measured to now, a slow listing (a big bucket on a busy machine) would close
a batch while uploads still came in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.ingest.records import ObjectChange

__all__ = ["Batch", "Batcher"]


@dataclass
class Batch:
    dataset: str
    changes: dict[str, ObjectChange] = field(default_factory=dict)  # by key: the newest change wins
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    first_at: float = 0.0
    last_at: float = 0.0

    def resolve(self, error: BaseException | None = None) -> None:
        for waiter in self.waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


def _newer(new: ObjectChange, old: ObjectChange) -> bool:
    """MinIO orders one key's events by sequencer (hex); without one, the later arrival wins."""
    if new.sequencer and old.sequencer:
        try:
            return int(new.sequencer, 16) >= int(old.sequencer, 16)
        except ValueError:
            return new.sequencer >= old.sequencer
    return True


class Batcher:
    def __init__(self, quiet_s: float, max_batch: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet_s = quiet_s
        self.max_batch = max_batch
        self.clock = clock
        self._open: dict[str, Batch] = {}
        self._in_flight: dict[str, ObjectChange] = {}  # changes of batches being versioned, by key
        self._observed: float | None = None  # with a poller: the start of its last finished listing

    def observed(self, until: float) -> None:
        """Every change made before ``until`` (by ``clock``) was added: the poller's listing began then."""
        self._observed = until

    def quiet_ends(self) -> float | None:
        """When the first open batch's quiet window ends, unless a listing already saw it end."""
        ends = [batch.last_at + self.quiet_s for batch in self._open.values()]
        return min((end for end in ends if self._observed is None or end > self._observed), default=None)

    def add(self, change: ObjectChange, waiter: asyncio.Future[None] | None = None) -> None:
        now = self.clock()
        batch = self._open.get(change.dataset_token)
        if batch is None:
            batch = self._open[change.dataset_token] = Batch(change.dataset_token, first_at=now)
        old = batch.changes.get(change.key)
        if old is None or _newer(change, old):
            batch.changes[change.key] = change
        if waiter is not None:
            batch.waiters.append(waiter)
        batch.last_at = now

    def pending(self, key: str) -> ObjectChange | None:
        """The change waiting for ``key`` or being versioned, if any (the poller does not add it twice)."""
        batch = self._open.get(key.split("/", 1)[0])
        waiting = batch.changes.get(key) if batch else None
        return waiting or self._in_flight.get(key)

    def due(self, *, flush: bool = False) -> list[Batch]:
        """Remove and return the batches that closed (all with ``flush``); call ``done`` after each."""
        now = self.clock()
        seen = now if self._observed is None else min(now, self._observed)
        closed = [
            name
            for name, batch in self._open.items()
            if flush or seen - batch.last_at >= self.quiet_s or len(batch.changes) >= self.max_batch
        ]
        batches = [self._open.pop(name) for name in closed]
        for batch in batches:
            self._in_flight.update(batch.changes)
        return batches

    def done(self, batch: Batch) -> None:
        for key, change in batch.changes.items():
            if self._in_flight.get(key) is change:
                del self._in_flight[key]

    def __len__(self) -> int:
        return sum(len(batch.changes) for batch in self._open.values())
