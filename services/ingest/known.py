"""The objects ingest has handled, one NATS KV entry per object (keyed by a hash of its S3 key).

The poller diffs each full listing of the bucket against these entries: a listed object that is not known
(or has another etag) arrived; a known object that is no longer listed was removed. Entries are written only
after the version that includes them is committed and pushed, so a crash before that makes the poller find
the objects again instead of losing them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

from nats.js.errors import KeyNotFoundError

from services.runtime.kvstore import LazyBucket

__all__ = ["KnownObject", "KnownObjects", "kv_key_for"]

_ANNOUNCED = "announced."  # one entry per dataset beside the object entries (which are hex hashes)


def kv_key_for(s3_key: str) -> str:
    """S3 keys may hold characters a KV key may not; the hash is always valid and fixed-length."""
    return hashlib.sha256(s3_key.encode("utf-8", errors="surrogatepass")).hexdigest()[:40]


@dataclass(frozen=True)
class KnownObject:
    key: str
    etag: str
    dataset: str
    status: Literal["versioned", "rejected", "left_out"]
    version: int = 0  # the newest dataset version that holds it (0 when rejected or left out)

    @classmethod
    def from_json(cls, raw: bytes) -> KnownObject:
        doc = json.loads(raw)
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})  # tolerate old fields


class KnownObjects(LazyBucket):
    async def load(self) -> dict[str, KnownObject]:
        """Every known object, by S3 key."""
        known = [
            KnownObject.from_json(raw)
            for key, raw in (await self.current()).items()
            if raw and not key.startswith(_ANNOUNCED)
        ]
        return {obj.key: obj for obj in known}

    async def get(self, s3_key: str) -> KnownObject | None:
        try:
            entry = await (await self.kv()).get(kv_key_for(s3_key))
        except KeyNotFoundError:
            return None
        return KnownObject.from_json(entry.value) if entry.value else None

    async def put(self, objects: list[KnownObject]) -> None:
        kv = await self.kv()
        for obj in objects:
            await kv.put(kv_key_for(obj.key), json.dumps(asdict(obj)).encode())

    async def forget(self, s3_keys: list[str]) -> None:
        kv = await self.kv()
        for key in s3_keys:
            await kv.delete(kv_key_for(key))

    async def announced(self, dataset: str) -> int:
        """The newest version of ``dataset`` whose ``dataset.versioned`` was sent (0: none)."""
        try:
            entry = await (await self.kv()).get(f"{_ANNOUNCED}{dataset}")
        except KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    async def set_announced(self, dataset: str, version: int) -> None:
        await (await self.kv()).put(f"{_ANNOUNCED}{dataset}", str(version).encode())
