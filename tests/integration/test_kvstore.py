"""NATS KV buckets on a real nats-server, as service users: read back in full while being written, and
followed live."""

from __future__ import annotations

import asyncio

import pytest

from services.ingest.known import KnownObject, KnownObjects
from services.runtime.bus import EventBus
from services.serving.gateway.catalog import Followed

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


async def test_a_followed_bucket_keeps_following_after_its_watch_consumer_is_deleted(
    service_settings, admin_bus
):
    """A service user that knows the name of another's ephemeral consumer may delete it (README, Known
    gaps; here the admin lists it); the gateway's watch of the rollout bucket makes itself a new one and
    goes on applying changes."""
    bucket = admin_bus.subjects.kv.rollout
    kv = await admin_bus.js.key_value(bucket)
    await kv.put("cells", b"1")
    async with (
        EventBus(service_settings("serving")) as gateway,
        EventBus(service_settings("ingest")) as other,
    ):
        followed = Followed(lambda: gateway.js, bucket, bytes)
        await followed.start()
        try:
            assert followed.values == {"cells": b"1"}
            (watch,) = await admin_bus.js.consumers_info(f"KV_{bucket}")
            assert await other.js.delete_consumer(f"KV_{bucket}", watch.name)
            await kv.put("cells", b"2")
            async with asyncio.timeout(30):  # two missed heartbeats (5 s each), then a new consumer
                while followed.values.get("cells") != b"2":
                    await asyncio.sleep(0.1)
            (renewed,) = await admin_bus.js.consumers_info(f"KV_{bucket}")
            assert renewed.name != watch.name
        finally:
            await followed.stop()


async def test_a_watch_gets_every_update_however_many_bytes_it_has_delivered(service_settings, admin_bus):
    """A KV watch is a push consumer with flow control: past about 2 MB delivered it waits for the
    service's flow-control reply, which the service user must be allowed to send, or the watch stops
    for good (the gateway would no longer see rollout changes)."""
    bucket = admin_bus.subjects.kv.rollout
    kv = await admin_bus.js.key_value(bucket)
    async with EventBus(service_settings("serving")) as gateway:
        followed = Followed(lambda: gateway.js, bucket, bytes)
        await followed.start()
        try:
            value = bytes(100 * 1024)
            for i in range(60):  # 6 MB
                await kv.put(f"m{i % 5}", value + str(i).encode())
            async with asyncio.timeout(20):
                while not followed.values.get("m4", b"").endswith(b"59"):
                    await asyncio.sleep(0.05)
        finally:
            await followed.stop()
