"""Reading a whole KV bucket back from a real nats-server, as a service user, while it is being written."""

from __future__ import annotations

import asyncio

import pytest

from services.ingest.known import KnownObject, KnownObjects
from services.runtime.bus import EventBus

pytestmark = pytest.mark.integration


async def test_a_bucket_is_read_back_in_full_without_its_deleted_keys(service_settings):
    async with EventBus(service_settings("ingest")) as bus:
        known = KnownObjects(lambda: bus.js, bus.subjects.kv.ingest_objects)
        assert await known.load() == {}
        objects = [
            KnownObject(f"digits/{i % 10}/{i:05d}.png", f"e{i}", "digits", "versioned", 1)
            for i in range(1500)
        ]
        await known.put(objects)
        await known.put(
            [KnownObject(objects[0].key, "new", "digits", "versioned", 2)]
        )  # history: newest wins
        await known.forget([o.key for o in objects[-100:]])
        await known.set_announced("digits", 2)  # a non-object entry beside them
        # Many readers at once, each racing the server's first deliveries: none may end early.
        listings = await asyncio.gather(*(known.load() for _ in range(8)))
        for listing in listings:
            assert len(listing) == 1400
            assert listing[objects[0].key].etag == "new" and objects[-1].key not in listing
        # The readers clean up after themselves: no consumer is left on the bucket's stream.
        info = await bus.js.stream_info(f"KV_{bus.subjects.kv.ingest_objects}")
        assert info.state.consumer_count == 0
