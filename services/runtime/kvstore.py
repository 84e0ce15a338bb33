"""A NATS KV bucket opened on first use: services build their stores before the connection exists."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

__all__ = ["LazyBucket"]

_DELETED = {"DEL", "PURGE"}
_READ_BATCH = 512


class LazyBucket:
    """Base of the small KV stores (known objects, policies, trainer state): ``await self.kv()``."""

    def __init__(self, js: Callable[[], JetStreamContext], bucket: str) -> None:
        self.js = js  # a getter: the connection exists only once the service started
        self.bucket = bucket
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js().key_value(self.bucket)
        return self._kv

    async def current(self) -> dict[str, bytes]:
        """Every key's current value (deleted keys left out), read in full.

        nats-py's ``watchall()`` and ``keys()`` mark the end of the current values from a consumer-info
        snapshot taken while the server already pushes them; on a busy machine that marker can come
        first and the listing ends empty. A pull consumer delivers nothing until asked, so the pending
        count it reports is exact, and the listing ends when a message says none is left.
        """
        js, prefix = self.js(), f"$KV.{self.bucket}."
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=60.0,  # the server removes it should this task die before the delete
            mem_storage=True,
        )
        sub = await js.pull_subscribe(f"{prefix}>", stream=f"KV_{self.bucket}", config=config)
        values: dict[str, bytes] = {}
        consumer = None
        try:
            info = await sub.consumer_info()
            consumer, remaining = info.name, info.num_pending or 0
            while remaining > 0:
                for msg in await sub.fetch(min(remaining, _READ_BATCH), timeout=10):
                    remaining = msg.metadata.num_pending
                    key = msg.subject[len(prefix) :]
                    headers = msg.headers or {}
                    if headers.get("KV-Operation") in _DELETED or "Nats-Marker-Reason" in headers:
                        values.pop(key, None)
                    else:
                        values[key] = msg.data
        finally:
            await sub.unsubscribe()
            if consumer is not None:
                with contextlib.suppress(Exception):  # gone already: the inactivity threshold covers it
                    await js.delete_consumer(f"KV_{self.bucket}", consumer)
        return values
