"""Prediction images kept by the gateway's fire-and-forget writer (``services/serving/gateway/kept.py``) on a
real nats-server: nats-py's own ``ObjectStore.get`` reads them back (digest checked), and a full store drops
its oldest images instead of refusing new ones."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.runtime.bus import EventBus
from services.serving.gateway.kept import CHUNK_BYTES, Kept

pytestmark = pytest.mark.integration


def kept(bus: EventBus) -> Kept:
    return Kept(lambda: bus.nc, lambda: bus.js, bus.subjects.predictions_store)


async def test_images_written_without_acks_read_back_whole_through_the_object_store(service_settings):
    async with EventBus(service_settings("serving")) as bus:
        store = kept(bus)
        small, large = os.urandom(3_000), os.urandom(2 * CHUNK_BYTES + 5)  # one chunk, three chunks
        await store.put("p-small", small, {"model": "digits", "version": 2, "label": "7"})
        await store.put("p-large", large, {"model": "digits", "version": 2, "label": "1"})
        await bus.nc.flush()
        got = await store.get("p-small")
        assert got is not None and got.data == small
        assert got.about == {"model": "digits", "version": 2, "label": "7"}
        got = await store.get("p-large")
        assert got is not None and got.data == large
        info = await (await bus.js.object_store(bus.subjects.predictions_store)).get_info("p-large")
        assert (info.size, info.chunks) == (len(large), 3)
        assert await store.get("never-kept") is None


async def test_a_full_store_drops_its_oldest_images_and_keeps_taking_new_ones(
    nats_server, prefix, service_settings
):
    # The store's stream holds 1 MiB (the admin's limit for this prefix): eighty 20 KB images cannot all fit.
    await nats_server.provision(prefix, inference_max_bytes=1024**2)
    async with EventBus(service_settings("serving")) as bus:
        assert (await bus.js.stream_info(f"OBJ_{bus.subjects.predictions_store}")).config.max_bytes == 1024**2
        store = kept(bus)
        images = {f"p{i:02d}": os.urandom(20_000) for i in range(80)}
        for name, data in images.items():
            await store.put(name, data, {"model": "digits"})
            await bus.nc.flush()
        newest = await asyncio.gather(*(store.get(f"p{i}") for i in range(75, 80)))
        assert [g.data if g else None for g in newest] == [images[f"p{i}"] for i in range(75, 80)]
        assert await store.get("p00") is None
