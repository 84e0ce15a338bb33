"""A NATS KV bucket opened on first use: services build their stores before the connection exists."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

__all__ = ["LazyBucket"]


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
