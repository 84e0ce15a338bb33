"""The bucket poller diffs full listings against the known objects (issue 3, "Triggers"):
services/ingest/poller.py with an in-memory bucket listing and known objects."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from services.ingest.batcher import Batcher
from services.ingest.known import KnownObject
from services.ingest.poller import Poller
from services.ingest.records import ObjectChange
from services.ingest.storage import Listed
from tests import images
from tests.fakes import MemoryKnown

pytestmark = pytest.mark.unit

BUCKET = "incoming"


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class Listing:
    """The part of an S3 store the poller uses: a full listing, in lexical key order as S3 gives it."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.failures: list[Exception] = []
        self.lists = 0

    def put(self, key: str, data: bytes) -> Listed:
        self.objects[key] = data
        return Listed(key, md5_of(data), len(data))

    async def list(self, bucket: str) -> list[Listed]:
        assert bucket == BUCKET
        self.lists += 1
        if self.failures:
            raise self.failures.pop(0)
        return [Listed(k, md5_of(v), len(v)) for k, v in sorted(self.objects.items())]

    async def download(self, bucket: str, key: str, dest: Path, max_bytes: int) -> tuple[str, int]:
        raise AssertionError("the poller never downloads")

    async def quarantine(self, *args: Any) -> str:
        raise AssertionError("the poller never quarantines")


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def listing() -> Listing:
    store = Listing()
    for label, name, data in images.digits_images(12):
        store.put(f"digits/{label}/{name}", data)
    return store


@pytest.fixture
def known() -> MemoryKnown:
    return MemoryKnown()


@pytest.fixture
def batcher() -> Batcher:
    return Batcher(quiet_s=3.0, max_batch=10_000, clock=Clock())


@pytest.fixture
def poller(listing: Listing, known: MemoryKnown, batcher: Batcher) -> Poller:
    return Poller(listing, known, batcher, BUCKET, interval_s=0.01)  # type: ignore[arg-type]


def waiting(batcher: Batcher) -> dict[str, ObjectChange]:
    """Every change waiting in the batcher, by key (without closing the batches)."""
    return {key: change for batch in batcher._open.values() for key, change in batch.changes.items()}


def versioned(listing: Listing, dataset: str = "digits", version: int = 1) -> list[KnownObject]:
    return [KnownObject(k, md5_of(v), dataset, "versioned", version) for k, v in listing.objects.items()]


async def test_the_first_poll_adds_every_listed_object(
    poller: Poller, listing: Listing, batcher: Batcher
) -> None:
    assert await poller.poll_once() == 12
    changes = waiting(batcher)
    assert set(changes) == set(listing.objects)
    for key, change in changes.items():
        data = listing.objects[key]
        assert change == ObjectChange(BUCKET, key, "created", etag=md5_of(data), size=len(data))
    assert len(batcher) == 12


async def test_known_objects_are_not_added_again(
    poller: Poller, listing: Listing, known: MemoryKnown, batcher: Batcher
) -> None:
    await known.put(versioned(listing))
    assert await poller.poll_once() == 0
    assert len(batcher) == 0
    # rejected and left-out objects are settled too: they come back only when they change
    rejected = listing.put("digits/1/garbage.png", images.garbage())
    twin = listing.put("digits/2/twin.png", images.gray_png())
    await known.put(
        [
            KnownObject(rejected.key, rejected.etag, "digits", "rejected"),
            KnownObject(twin.key, twin.etag, "digits", "left_out"),
        ]
    )
    assert await poller.poll_once() == 0


async def test_a_restart_after_the_version_was_remembered_finds_nothing(
    listing: Listing, known: MemoryKnown, batcher: Batcher
) -> None:
    first = Poller(listing, known, batcher, BUCKET, 1.0)  # type: ignore[arg-type]
    assert await first.poll_once() == 12
    [batch] = batcher.due(flush=True)
    await known.put([KnownObject(c.key, c.etag, "digits", "versioned", 1) for c in batch.changes.values()])
    batcher.done(batch)

    fresh = Batcher(quiet_s=3.0, max_batch=10_000, clock=Clock())  # a new process: nothing pending
    restarted = Poller(listing, known, fresh, BUCKET, 1.0)  # type: ignore[arg-type]
    assert await restarted.poll_once() == 0 and len(fresh) == 0


async def test_a_restart_before_the_version_was_remembered_finds_everything_again(
    listing: Listing, known: MemoryKnown
) -> None:
    crashed = Batcher(quiet_s=3.0, max_batch=10_000, clock=Clock())
    assert await Poller(listing, known, crashed, BUCKET, 1.0).poll_once() == 12  # type: ignore[arg-type]
    fresh = Batcher(quiet_s=3.0, max_batch=10_000, clock=Clock())
    assert await Poller(listing, known, fresh, BUCKET, 1.0).poll_once() == 12  # type: ignore[arg-type]


async def test_a_changed_etag_is_added_again(
    poller: Poller, listing: Listing, known: MemoryKnown, batcher: Batcher
) -> None:
    await known.put(versioned(listing))
    key = next(iter(listing.objects))
    new = listing.put(key, images.gray_png(32, 32, seed=5))
    assert await poller.poll_once() == 1
    assert waiting(batcher) == {key: ObjectChange(BUCKET, key, "created", etag=new.etag, size=new.size)}


async def test_a_new_object_among_known_ones_is_added(
    poller: Poller, listing: Listing, known: MemoryKnown, batcher: Batcher
) -> None:
    await known.put(versioned(listing))
    # lexically before every known key: a cursor over the listing would miss it
    early = listing.put("aaa/0/first.png", images.gray_png())
    assert await poller.poll_once() == 1
    assert list(waiting(batcher)) == [early.key]


async def test_an_object_missing_from_the_listing_is_removed(
    poller: Poller, listing: Listing, known: MemoryKnown, batcher: Batcher
) -> None:
    await known.put(versioned(listing))
    gone = sorted(listing.objects)[:2]
    for key in gone:
        del listing.objects[key]
    # a rejected object deleted from the bucket is removed as well (versioning just forgets it)
    await known.put([KnownObject("digits/3/bad.png", "e", "digits", "rejected")])
    assert await poller.poll_once() == 3
    assert waiting(batcher) == {
        key: ObjectChange(BUCKET, key, "removed") for key in [*gone, "digits/3/bad.png"]
    }


async def test_an_object_pending_in_the_batcher_is_not_added_twice(
    poller: Poller, listing: Listing, batcher: Batcher
) -> None:
    assert await poller.poll_once() == 12
    assert await poller.poll_once() == 0  # still waiting for its quiet window
    assert len(batcher) == 12
    [batch] = batcher.due(flush=True)
    assert await poller.poll_once() == 0  # being versioned
    assert len(batcher) == 0
    batcher.done(batch)  # the version failed: nothing was remembered, so the objects come again
    assert await poller.poll_once() == 12


async def test_a_pending_object_that_changes_again_is_added_with_its_new_etag(
    poller: Poller, listing: Listing, known: MemoryKnown, batcher: Batcher
) -> None:
    await poller.poll_once()
    key = sorted(listing.objects)[0]
    new = listing.put(key, images.gray_png(seed=9))
    assert await poller.poll_once() == 1
    assert waiting(batcher)[key].etag == new.etag
    assert len(batcher) == 12


async def test_a_removal_pending_in_the_batcher_is_not_added_twice(
    poller: Poller, listing: Listing, known: MemoryKnown, batcher: Batcher
) -> None:
    await known.put(versioned(listing))
    key = sorted(listing.objects)[0]
    del listing.objects[key]
    assert await poller.poll_once() == 1
    assert await poller.poll_once() == 0
    assert waiting(batcher) == {key: ObjectChange(BUCKET, key, "removed")}
    listing.put(key, images.gray_png(seed=3))  # uploaded again, with other content, while it waits
    assert await poller.poll_once() == 1
    assert waiting(batcher)[key].kind == "created"


async def test_a_slow_listing_does_not_close_a_batch_while_uploads_come_in(
    listing: Listing, known: MemoryKnown
) -> None:
    """Each listing takes 2.5 s, the poller waits 1 s between them, a file arrives every 2.5 s, and the
    ingest loop looks for closed batches every 0.5 s. Measured to now, the quiet window (3 s) ran out during
    every second listing although uploads never paused for 3 s: the CI run where a demo's 250 feedback images
    became a version of 74. Measured to each listing's start, the batch waits for the uploads to stop."""
    clock = Clock()
    batcher = Batcher(quiet_s=3.0, max_batch=10_000, clock=clock)
    poller = Poller(listing, known, batcher, BUCKET, 1.0)  # type: ignore[arg-type]
    closed: list[int] = []
    snapshot = listing.list

    async def list_slowly(bucket: str) -> list[Listed]:
        found = await snapshot(bucket)
        for _ in range(5):
            clock.now += 0.5
            closed.extend(len(batch.changes) for batch in batcher.due())
        return found

    listing.list = list_slowly  # type: ignore[method-assign]
    uploads = [2.5 * i for i in range(1, 7)]  # the last at 15 s
    while clock.now < 40.0:
        for at in [t for t in uploads if t <= clock.now]:
            listing.put(f"digits/1/late-{at}.png", images.gray_png(seed=int(at * 10)))
            uploads.remove(at)
        await poller.poll_once()
        closed.extend(len(batch.changes) for batch in batcher.due())
        clock.now += 1.0
    assert closed == [12 + 6]  # one batch: the 12 listed at first and every later upload


async def test_the_poller_lists_again_when_a_quiet_window_ends(listing: Listing, known: MemoryKnown) -> None:
    clock = Clock()
    batcher = Batcher(quiet_s=3.0, max_batch=10_000, clock=clock)
    poller = Poller(listing, known, batcher, BUCKET, 10.0)  # type: ignore[arg-type]
    assert poller.pause() == 10.0  # nothing waits
    clock.now = 1.0
    await poller.poll_once()  # finds the 12 at 1 s
    clock.now = 2.5
    assert poller.pause() == 1.5  # the listing that can close the batch starts at 4 s, not 11 s
    clock.now = 5.0  # late (a slow listing before): at once
    assert poller.pause() == 0.0
    await poller.poll_once()  # began 4 s after the arrivals, found nothing new
    assert poller.pause() == 10.0  # the batch is due: no listing is needed for it
    assert [len(batch.changes) for batch in batcher.due()] == [12]


async def test_run_keeps_polling_when_the_store_fails(
    poller: Poller, listing: Listing, batcher: Batcher
) -> None:
    listing.failures = [ConnectionError("rclone is restarting"), TimeoutError("slow")]
    task = asyncio.create_task(poller.run())
    try:
        for _ in range(200):
            if len(batcher) == 12:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(batcher) == 12
    assert listing.lists >= 3
