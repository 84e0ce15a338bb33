"""In-memory stand-ins for external systems, for unit tests of domain logic only (integration tests use
the real servers)."""

from __future__ import annotations

from services.ingest.known import KnownObject


class MemoryKnown:
    """KnownObjects (NATS KV) in a dict, with the same async methods."""

    def __init__(self) -> None:
        self.objects: dict[str, KnownObject] = {}
        self.marks: dict[str, int] = {}

    async def load(self) -> dict[str, KnownObject]:
        return dict(self.objects)

    async def get(self, s3_key: str) -> KnownObject | None:
        return self.objects.get(s3_key)

    async def put(self, objects: list[KnownObject]) -> None:
        for obj in objects:
            self.objects[obj.key] = obj

    async def forget(self, s3_keys: list[str]) -> None:
        for key in s3_keys:
            self.objects.pop(key, None)

    async def announced(self, dataset: str) -> int:
        return self.marks.get(dataset, 0)

    async def set_announced(self, dataset: str, version: int) -> None:
        self.marks[dataset] = version
