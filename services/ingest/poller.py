"""The bucket poller: the trigger for any S3 store without notifications (the embedded rclone S3).

S3 lists keys in lexical order, so a cursor would miss keys added before it and never see deletions. Each
poll therefore diffs the full listing against the known objects (NATS KV): what is listed but unknown, or
known with another etag, arrived; what is known but no longer listed was removed.
"""

from __future__ import annotations

import asyncio
import time

from services.ingest.batcher import Batcher
from services.ingest.known import KnownObjects
from services.ingest.records import ObjectChange
from services.ingest.storage import ObjectStore
from services.runtime.telemetry import get_logger

__all__ = ["Poller"]


class Poller:
    def __init__(
        self, store: ObjectStore, known: KnownObjects, batcher: Batcher, bucket: str, interval_s: float
    ) -> None:
        self.store, self.known, self.batcher = store, known, batcher
        self.bucket, self.interval_s = bucket, interval_s
        self.log = get_logger(component="poller")

    async def poll_once(self) -> int:
        """One listing, diffed; returns how many changes it handed to the batcher."""
        started = self.batcher.clock()
        listed = await self.store.list(self.bucket)
        known = await self.known.load()
        changes = []
        for obj in listed:
            seen = known.get(obj.key)
            waiting = self.batcher.pending(obj.key)
            back = waiting is not None and waiting.kind == "removed"  # re-uploaded before its removal ran
            if seen is None or seen.etag != obj.etag or back:
                changes.append(ObjectChange(self.bucket, obj.key, "created", etag=obj.etag, size=obj.size))
        present = {obj.key for obj in listed}
        changes += [ObjectChange(self.bucket, key, "removed") for key in known if key not in present]
        new = 0
        for change in changes:
            waiting = self.batcher.pending(change.key)
            if waiting is not None and (waiting.kind, waiting.etag) == (change.kind, change.etag):
                continue  # already in a batch (waiting or being versioned)
            self.batcher.add(change)
            new += 1
        self.batcher.observed(started)  # quiet windows are measured to this listing's start
        return new

    async def run(self) -> None:
        while True:
            try:
                started = time.monotonic()
                found = await self.poll_once()
                if found:
                    seconds = round(time.monotonic() - started, 3)
                    self.log.info("objects changed", bucket=self.bucket, changes=found, poll_s=seconds)
            except Exception as exc:  # the store is down: say so and try again next time
                self.log.warning("polling failed", bucket=self.bucket, error=repr(exc))
                await asyncio.sleep(self.interval_s)
            else:
                await asyncio.sleep(self.pause())

    def pause(self) -> float:
        """The poll interval, or less when a batch's quiet window ends sooner: a listing then closes it."""
        ends = self.batcher.quiet_ends()
        if ends is None:
            return self.interval_s
        return min(self.interval_s, max(0.0, ends - self.batcher.clock()))
