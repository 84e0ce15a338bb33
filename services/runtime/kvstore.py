"""A NATS KV bucket opened on first use: services build their stores before the connection exists."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from services.runtime.pull import read_through

__all__ = ["LazyBucket"]

_DELETED = {"DEL", "PURGE"}


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
        """Every key's current value (deleted keys left out), read in full (``read_through``)."""
        prefix = f"$KV.{self.bucket}."
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
        values: dict[str, bytes] = {}
        async for msg in read_through(self.js(), f"KV_{self.bucket}", f"{prefix}>", config):
            key, headers = msg.subject[len(prefix) :], msg.headers or {}
            if headers.get("KV-Operation") in _DELETED or "Nats-Marker-Reason" in headers:
                values.pop(key, None)
            else:
                values[key] = msg.data
        return values
