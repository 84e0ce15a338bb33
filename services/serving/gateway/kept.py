"""The images of recent predictions, kept in the NATS object store ``<prefix>_predictions`` so that feedback
can label them later.

nats-py's ``ObjectStore.put`` first asks for the object's current entry, then waits for the ack of each
chunk and of the meta message: three round trips and three socket writes per image, the largest share of the
gateway's CPU per request after the request itself (bench/serve.py). A prediction id is new, so there is
nothing to ask for: ``Kept.put`` publishes the chunks and the meta message in the object store's documented
wire format (NATS ADR-20: chunks on ``$O.<bucket>.C.<nuid>``, the JSON object info on
``$O.<bucket>.M.<base64url(name)>`` with a ``Nats-Rollup: sub`` header) without waiting, so they leave in one
write. Reading goes through nats-py's own ``ObjectStore.get``, which checks the SHA-256 digest.

Nothing is acked, so the store must never refuse a write: its stream drops its oldest messages when full
(``services/runtime/streams.py``), and the newest predictions are always the ones kept. A publish the client
cannot even buffer (NATS unreachable for long) raises, and the gateway counts the image as not kept.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError

__all__ = ["CHUNK_BYTES", "Kept", "KeptImage"]

CHUNK_BYTES = 128 * 1024  # nats-py's default chunk size, well under any server's max_payload
READ_TIMEOUT_S = 5.0  # a meta message whose chunks were dropped would otherwise wait for them for ever


@dataclass(frozen=True)
class KeptImage:
    data: bytes
    about: dict[str, Any]


class Kept:
    """``put`` an image under a new name (no round trip); ``get`` it back, or None when it is not held."""

    def __init__(self, nc: Callable[[], Client], js: Callable[[], JetStreamContext], bucket: str) -> None:
        self._nc, self._js, self.bucket = nc, js, bucket
        self._store: Any = None

    async def put(self, name: str, data: bytes, about: dict[str, Any]) -> None:
        nc = self._nc()
        nuid = uuid.uuid4().hex  # the chunks' subject token: any unique one
        chunks = f"$O.{self.bucket}.C.{nuid}"
        for start in range(0, len(data), CHUNK_BYTES):
            await nc.publish(chunks, data[start : start + CHUNK_BYTES])
        info = {
            "name": name,
            "bucket": self.bucket,
            "nuid": nuid,
            "size": len(data),
            "mtime": datetime.now(UTC).isoformat(),
            "chunks": -(-len(data) // CHUNK_BYTES),
            "digest": "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode(),
            "description": json.dumps(about),
            "options": {"max_chunk_size": CHUNK_BYTES},
        }
        meta = f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        await nc.publish(meta, json.dumps(info).encode(), headers={"Nats-Rollup": "sub"})

    async def get(self, name: str) -> KeptImage | None:
        if self._store is None:
            self._store = await self._js().object_store(self.bucket)
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                found = await self._store.get(name)
        except (ObjectNotFoundError, NotFoundError, TimeoutError):
            return None
        return KeptImage(bytes(found.data or b""), json.loads(found.info.description or "{}"))
