"""Arrivals batched per dataset by a quiet window or a maximum size (issue 3, "Batching"):
services/ingest/batcher.py, driven by a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from services.ingest.batcher import Batch, Batcher
from services.ingest.records import ObjectChange

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def created(key: str, etag: str = "e1", sequencer: str = "") -> ObjectChange:
    return ObjectChange("incoming", key, "created", etag=etag, size=10, sequencer=sequencer)


def removed(key: str, sequencer: str = "") -> ObjectChange:
    return ObjectChange("incoming", key, "removed", sequencer=sequencer)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def batcher(clock: Clock) -> Batcher:
    return Batcher(quiet_s=3.0, max_batch=100, clock=clock)


def test_the_quiet_window_counts_from_the_last_arrival(batcher: Batcher, clock: Clock) -> None:
    batcher.add(created("digits/1/a.png"))
    clock.advance(2.0)
    assert batcher.due() == []
    batcher.add(created("digits/1/b.png"))  # arrivals keep the batch open
    clock.advance(2.0)  # 4 s after the first, 2 s after the last
    assert batcher.due() == []
    batcher.add(created("digits/1/c.png"))
    clock.advance(2.999)
    assert batcher.due() == []
    assert len(batcher) == 3
    clock.now = 1007.0  # exactly 3 s after the last arrival
    [batch] = batcher.due()
    assert batch.dataset == "digits"
    assert sorted(batch.changes) == ["digits/1/a.png", "digits/1/b.png", "digits/1/c.png"]
    assert (batch.first_at, batch.last_at) == (1000.0, 1004.0)
    assert len(batcher) == 0
    assert batcher.due() == []  # handed out once


def test_with_a_poller_quiet_counts_to_the_start_of_its_last_listing(batcher: Batcher, clock: Clock) -> None:
    batcher.observed(999.0)  # a listing began at 999 and found the file at 1000
    batcher.add(created("digits/1/a.png"))
    clock.advance(10.0)  # a long time, but no listing has looked since
    assert batcher.due() == []
    batcher.observed(1002.9)  # a listing that began 2.9 s after the arrival found nothing new
    assert batcher.due() == []
    batcher.observed(1003.0)
    [batch] = batcher.due()
    assert list(batch.changes) == ["digits/1/a.png"]
    batcher.add(created("digits/1/b.png"))  # at 1010
    batcher.observed(1020.0)  # never past now (a clock reading later than the batcher's own)
    assert batcher.due() == []
    clock.advance(3.0)
    assert len(batcher.due()) == 1


def test_a_full_batch_closes_before_its_quiet_window(clock: Clock) -> None:
    batcher = Batcher(quiet_s=3.0, max_batch=3, clock=clock)
    batcher.add(created("digits/1/a.png"))
    batcher.add(created("digits/1/b.png"))
    assert batcher.due() == []
    batcher.add(created("digits/1/b.png", etag="e2"))  # the same key again: still two files
    assert batcher.due() == []
    batcher.add(created("digits/1/c.png"))
    [batch] = batcher.due()  # no time passed
    assert len(batch.changes) == 3
    batcher.add(created("digits/1/d.png"))  # the next arrival opens a new batch
    assert batcher.due() == []
    assert len(batcher) == 1


def test_datasets_are_batched_apart(batcher: Batcher, clock: Clock) -> None:
    batcher.add(created("digits/1/a.png"))
    clock.advance(2.0)
    batcher.add(created("cells/mitosis/a.tif"))
    batcher.add(created("cells/mitosis/b.tif"))
    clock.advance(1.0)
    [digits] = batcher.due()  # cells arrived later: its window is still open
    assert digits.dataset == "digits" and list(digits.changes) == ["digits/1/a.png"]
    clock.advance(2.0)
    [cells] = batcher.due()
    assert cells.dataset == "cells" and sorted(cells.changes) == [
        "cells/mitosis/a.tif",
        "cells/mitosis/b.tif",
    ]


def test_keys_that_name_no_dataset_are_batched_under_their_first_segment(batcher: Batcher) -> None:
    batcher.add(created("loose.png"))
    batcher.add(created("Bad Name/x/y.png"))
    batches = {b.dataset: b for b in batcher.due(flush=True)}
    assert set(batches) == {"loose.png", "Bad Name"}  # versioning rejects them with a reason


def test_flush_closes_every_open_batch(batcher: Batcher) -> None:
    batcher.add(created("digits/1/a.png"))
    batcher.add(created("cells/0/a.png"))
    assert batcher.due() == []
    assert sorted(b.dataset for b in batcher.due(flush=True)) == ["cells", "digits"]
    assert batcher.due(flush=True) == []


def test_the_newest_change_by_sequencer_wins(batcher: Batcher) -> None:
    # MinIO may deliver one key's events out of order; its sequencer (hex) orders them.
    batcher.add(created("digits/1/a.png", etag="second", sequencer="17B2C5A3F1E0D4B0"))
    batcher.add(created("digits/1/a.png", etag="first", sequencer="17B2C5A3F1E0D4A0"))  # late, older
    batcher.add(removed("digits/1/b.png", sequencer="0A"))
    batcher.add(created("digits/1/b.png", etag="before-delete", sequencer="9"))  # 0x9 < 0xA
    # numeric, not lexical: "10" (16) is newer than "F" (15)
    batcher.add(created("digits/1/c.png", etag="old", sequencer="F"))
    batcher.add(created("digits/1/c.png", etag="new", sequencer="10"))
    [batch] = batcher.due(flush=True)
    assert batch.changes["digits/1/a.png"].etag == "second"
    assert batch.changes["digits/1/b.png"].kind == "removed"
    assert batch.changes["digits/1/c.png"].etag == "new"


def test_without_sequencers_the_later_arrival_wins(batcher: Batcher) -> None:
    batcher.add(created("digits/1/a.png", etag="e1"))
    batcher.add(created("digits/1/a.png", etag="e2"))
    batcher.add(created("digits/1/b.png", etag="e1"))
    batcher.add(removed("digits/1/b.png"))
    batcher.add(removed("digits/1/c.png"))
    batcher.add(created("digits/1/c.png", etag="back"))
    # a sequencer on only one side does not order them either
    batcher.add(created("digits/1/d.png", etag="sequenced", sequencer="FF"))
    batcher.add(created("digits/1/d.png", etag="polled"))
    [batch] = batcher.due(flush=True)
    assert batch.changes["digits/1/a.png"].etag == "e2"
    assert batch.changes["digits/1/b.png"].kind == "removed"
    assert batch.changes["digits/1/c.png"] == created("digits/1/c.png", etag="back")
    assert batch.changes["digits/1/d.png"].etag == "polled"
    assert len(batch.changes) == 4


def test_an_older_duplicate_still_extends_the_quiet_window(batcher: Batcher, clock: Clock) -> None:
    batcher.add(created("digits/1/a.png", etag="new", sequencer="02"))
    clock.advance(2.5)
    batcher.add(created("digits/1/a.png", etag="old", sequencer="01"))  # replayed: ignored, but an arrival
    clock.advance(2.5)
    assert batcher.due() == []
    clock.advance(0.5)
    [batch] = batcher.due()
    assert batch.changes["digits/1/a.png"].etag == "new"


def test_pending_sees_waiting_and_in_flight_changes_until_done(batcher: Batcher, clock: Clock) -> None:
    a, b = created("digits/1/a.png"), removed("digits/1/b.png")
    assert batcher.pending(a.key) is None
    batcher.add(a)
    batcher.add(b)
    assert batcher.pending(a.key) == a and batcher.pending(b.key) == b
    assert batcher.pending("digits/1/other.png") is None
    assert batcher.pending("cells/1/a.png") is None
    clock.advance(3.0)
    [batch] = batcher.due()
    assert len(batcher) == 0  # no longer waiting...
    assert batcher.pending(a.key) == a and batcher.pending(b.key) == b  # ...but being versioned
    batcher.done(batch)
    assert batcher.pending(a.key) is None and batcher.pending(b.key) is None


def test_a_newer_change_waits_while_the_older_is_versioned(batcher: Batcher, clock: Clock) -> None:
    old = created("digits/1/a.png", etag="old")
    batcher.add(old)
    [first] = batcher.due(flush=True)
    new = created("digits/1/a.png", etag="new")
    batcher.add(new)
    assert batcher.pending(new.key) == new  # the waiting change shows before the in-flight one
    batcher.done(first)
    assert batcher.pending(new.key) == new
    [second] = batcher.due(flush=True)
    assert second.changes[new.key] is new
    assert batcher.pending(new.key) == new
    batcher.done(second)
    assert batcher.pending(new.key) is None


def test_done_of_an_older_batch_keeps_a_newer_in_flight_change(batcher: Batcher) -> None:
    batcher.add(created("digits/1/a.png", etag="old"))
    [first] = batcher.due(flush=True)
    batcher.add(created("digits/1/a.png", etag="new"))
    [second] = batcher.due(flush=True)
    batcher.done(first)
    pending = batcher.pending("digits/1/a.png")
    assert pending is not None and pending.etag == "new"
    batcher.done(second)
    assert batcher.pending("digits/1/a.png") is None


async def test_waiters_are_resolved_when_the_batch_is_versioned(batcher: Batcher) -> None:
    loop = asyncio.get_running_loop()
    w1, w2, w3 = loop.create_future(), loop.create_future(), loop.create_future()
    batcher.add(created("digits/1/a.png", sequencer="02"), w1)
    batcher.add(created("digits/1/a.png", sequencer="01"), w2)  # an older replay: acked with the batch
    batcher.add(created("digits/1/b.png"), w3)
    batcher.add(created("digits/1/c.png"))  # from the poller: no waiter
    [batch] = batcher.due(flush=True)
    assert batch.waiters == [w1, w2, w3]
    assert not any(w.done() for w in (w1, w2, w3))
    batch.resolve()
    assert all(w.done() and w.result() is None for w in (w1, w2, w3))
    batch.resolve()  # twice: no InvalidStateError


async def test_waiters_fail_with_the_versioning_error() -> None:
    loop = asyncio.get_running_loop()
    cancelled, waiting = loop.create_future(), loop.create_future()
    cancelled.cancel()  # the notification's handler went away
    batch = Batch("digits", waiters=[cancelled, waiting])
    error = RuntimeError("dvc push failed")
    batch.resolve(error)
    assert cancelled.cancelled()
    with pytest.raises(RuntimeError, match="dvc push failed"):
        await waiting


async def test_a_waiter_is_released_only_by_its_own_batch(batcher: Batcher) -> None:
    loop = asyncio.get_running_loop()
    digits_waiter, cells_waiter = loop.create_future(), loop.create_future()
    batcher.add(created("digits/1/a.png"), digits_waiter)
    batcher.add(created("cells/1/a.png"), cells_waiter)
    batches = {b.dataset: b for b in batcher.due(flush=True)}
    batches["digits"].resolve()
    assert digits_waiter.done() and not cells_waiter.done()
    batches["cells"].resolve(ValueError("boom"))
    assert isinstance(cells_waiter.exception(), ValueError)
