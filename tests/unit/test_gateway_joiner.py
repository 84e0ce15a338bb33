"""The gateway's joining of concurrent requests (``Joiner``), with a Triton stand-in that answers each row
with its own value, so a row answered to the wrong request shows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.serving.gateway.joiner import Joiner, Rows


class Triton:
    """Answers a batch with logits = its rows' first values, after ``gate`` opens; records batch sizes."""

    def __init__(self, max_batch: int = 0) -> None:
        self.sizes: list[int] = []
        self.gate = asyncio.Event()
        self.max_batch = max_batch
        self.fail: Exception | None = None

    async def send(self, batch: np.ndarray) -> Rows:
        assert not self.max_batch or len(batch) <= self.max_batch, "more rows than Triton takes"
        self.sizes.append(len(batch))
        await self.gate.wait()
        if self.fail:
            raise self.fail
        return batch[:, :1].copy(), batch[:, :2] * 10


def rows(start: int, count: int = 1) -> np.ndarray:
    return np.arange(start, start + count, dtype=np.float32)[:, None].repeat(3, axis=1)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_beyond_the_in_flight_limit_wait_and_go_as_one_each_getting_its_own_rows():
    joiner, triton = Joiner(in_flight=2), Triton()
    sizes = [1 + i % 3 for i in range(8)]
    calls = [
        asyncio.create_task(joiner.infer("v1", rows(10 * i, n), 0, triton.send)) for i, n in enumerate(sizes)
    ]
    await settle()
    assert triton.sizes == [1, 2]  # the first two go at once, alone
    assert joiner.waiting == 6
    triton.gate.set()
    answers = await asyncio.gather(*calls)
    assert triton.sizes[:2] == [1, 2] and sum(triton.sizes) == sum(sizes)
    assert len(triton.sizes) < 8  # the waiting joined
    for i, (logits, embedding) in enumerate(answers):
        np.testing.assert_array_equal(logits[:, 0], np.arange(10 * i, 10 * i + 1 + i % 3))
        assert embedding is not None and embedding.shape == (1 + i % 3, 2)
    assert joiner.waiting == 0 and not joiner._lanes


async def test_nothing_waits_under_light_load_and_keys_do_not_mix():
    joiner, triton = Joiner(in_flight=1), Triton()
    triton.gate.set()
    for i in range(3):  # one at a time: each alone
        await joiner.infer("v1", rows(i), 0, triton.send)
    assert triton.sizes == [1, 1, 1]
    triton.sizes.clear()
    triton.gate.clear()
    both = [asyncio.create_task(joiner.infer(key, rows(1), 0, triton.send)) for key in ("v1", "v2")]
    await settle()
    assert triton.sizes == [1, 1]  # another version has its own requests in flight
    triton.gate.set()
    await asyncio.gather(*both)


async def test_a_joined_request_stays_within_the_max_batch_and_a_larger_request_goes_in_parts():
    joiner, triton = Joiner(in_flight=1), Triton(max_batch=4)
    first = asyncio.create_task(joiner.infer("v1", rows(0), 4, triton.send))
    await settle()
    waiting = [asyncio.create_task(joiner.infer("v1", rows(100 * i, 3), 4, triton.send)) for i in range(1, 4)]
    big = asyncio.create_task(joiner.infer("v1", rows(1000, 10), 4, triton.send))  # parts of 4, 4 and 2
    await settle()
    triton.gate.set()
    await first
    answers = await asyncio.gather(*waiting)
    logits, _ = await big
    np.testing.assert_array_equal(logits[:, 0], np.arange(1000, 1010))
    for i, (answer, _) in enumerate(answers, start=1):
        np.testing.assert_array_equal(answer[:, 0], np.arange(100 * i, 100 * i + 3))
    assert max(triton.sizes) <= 4 and sum(triton.sizes) == 1 + 9 + 10


async def test_a_failed_joined_request_fails_each_of_its_requests_and_a_cancelled_one_is_left_out():
    joiner, triton = Joiner(in_flight=1), Triton()
    first = asyncio.create_task(joiner.infer("v1", rows(0), 0, triton.send))
    await settle()
    gives_up = asyncio.create_task(joiner.infer("v1", rows(1), 0, triton.send))
    others = [asyncio.create_task(joiner.infer("v1", rows(i), 0, triton.send)) for i in (2, 3)]
    await settle()
    gives_up.cancel()  # its request timed out while waiting
    triton.fail = RuntimeError("Triton is down")
    triton.gate.set()
    with pytest.raises(RuntimeError):
        await first
    for other in others:
        with pytest.raises(RuntimeError, match="Triton is down"):
            await other
    assert gives_up.cancelled()
    assert triton.sizes == [1, 2]  # the cancelled request was not sent
    assert not joiner._lanes


async def test_no_joining_sends_each_request_at_once_and_stop_cancels_what_is_in_flight():
    joiner, triton = Joiner(in_flight=0), Triton()
    calls = [asyncio.create_task(joiner.infer("v1", rows(i), 0, triton.send)) for i in range(5)]
    await settle()
    assert triton.sizes == [1] * 5
    triton.gate.set()
    await asyncio.gather(*calls)

    joiner, triton = Joiner(in_flight=1), Triton()
    first = asyncio.create_task(joiner.infer("v1", rows(0), 0, triton.send))
    await settle()
    waiting = asyncio.create_task(joiner.infer("v1", rows(1), 0, triton.send))
    await settle()
    first.cancel()  # its request gave up; the waiting one goes now
    await settle()
    assert triton.sizes == [1, 1]
    queued = asyncio.create_task(joiner.infer("v1", rows(2), 0, triton.send))
    await settle()
    assert joiner.waiting == 1
    await joiner.stop()
    for call in (waiting, queued):  # the one in flight, the one waiting for it
        with pytest.raises(asyncio.CancelledError):
            await call
