"""Concurrent predict requests for one model version, joined into fewer Triton requests.

A worker keeps at most ``in_flight`` Triton requests out at once for each model version (and input). A
request that comes while all of them are out waits; as soon as one comes back, everything waiting goes to
Triton as one request, up to the model's max batch size. Nothing waits for company: under light load each
request goes at once, alone, so no latency is added; under load, requests travel together and the work
Triton does per request (gRPC, its scheduler, the Python backend's stub) is paid once for several. Triton's
dynamic batcher then joins these requests across workers as before. KServe's batcher and Ray Serve's
``@serve.batch`` join requests the same way, on a timer instead.

A request of more images than the max batch size goes in parts of at most that size (Triton refuses more).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Joiner", "Rows", "Send"]

Rows = tuple[np.ndarray, np.ndarray | None]
"""The answer to a batch: its logits and its embeddings (None where the version has none), row by row."""

Send = Callable[[np.ndarray], Awaitable[Rows]]
"""One Triton request for a batch."""


@dataclass
class _Waiting:
    batch: np.ndarray
    send: Send
    max_batch: int
    answer: asyncio.Future[Rows]


@dataclass
class _Lane:
    busy: int = 0
    waiting: deque[_Waiting] = field(default_factory=deque)


class Joiner:
    """``await infer(key, batch, max_batch, send)``: ``batch``'s rows, answered alone or together with the
    other requests of ``key`` (requests of one key must be sendable as one batch: the same version, input
    and sample shape). ``in_flight`` 0: no joining, each request goes alone at once."""

    def __init__(self, in_flight: int) -> None:
        self.in_flight = in_flight
        self._lanes: dict[Hashable, _Lane] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def infer(self, key: Hashable, batch: np.ndarray, max_batch: int, send: Send) -> Rows:
        """``max_batch``: the most rows Triton takes in one request (0: no limit known)."""
        if 0 < max_batch < len(batch):
            parts = range(0, len(batch), max_batch)
            answers = await asyncio.gather(
                *(self.infer(key, batch[i : i + max_batch], max_batch, send) for i in parts)
            )
            embeddings = [e for _, e in answers]
            return (
                np.concatenate([logits for logits, _ in answers]),
                None if any(e is None for e in embeddings) else np.concatenate(embeddings),  # type: ignore[arg-type]
            )
        if self.in_flight == 0:
            return await send(batch)
        lane = self._lanes.setdefault(key, _Lane())
        if lane.busy < self.in_flight:  # then nothing waits (a returning request takes the waiting along)
            lane.busy += 1
            try:
                return await send(batch)
            finally:
                self._done(key, lane)
        answer: asyncio.Future[Rows] = asyncio.get_running_loop().create_future()
        lane.waiting.append(_Waiting(batch, send, max_batch, answer))
        return await answer  # cancelled (the request's timeout): left out of the next request

    @property
    def waiting(self) -> int:
        return sum(len(lane.waiting) for lane in self._lanes.values())

    async def stop(self) -> None:
        """Cancel the joined requests in flight and those waiting."""
        for lane in self._lanes.values():
            for waiting in lane.waiting:
                waiting.answer.cancel()
        for task in list(self._sending):
            task.cancel()
        if self._sending:
            await asyncio.wait(self._sending)

    def _done(self, key: Hashable, lane: _Lane) -> None:
        """A request of ``lane`` came back: the waiting go, as few requests as their sizes allow."""
        lane.busy -= 1
        while lane.waiting and lane.busy < self.in_flight:
            taken: list[_Waiting] = []
            rows = 0
            while lane.waiting:
                first = lane.waiting[0]
                if first.answer.done():  # its request gave up waiting
                    lane.waiting.popleft()
                    continue
                if taken and first.max_batch and rows + len(first.batch) > first.max_batch:
                    break
                taken.append(lane.waiting.popleft())
                rows += len(first.batch)
            if not taken:
                break
            lane.busy += 1
            task = asyncio.create_task(self._send_joined(key, lane, taken))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        if lane.busy == 0 and not lane.waiting:
            self._lanes.pop(key, None)

    async def _send_joined(self, key: Hashable, lane: _Lane, taken: list[_Waiting]) -> None:
        try:
            batch = taken[0].batch if len(taken) == 1 else np.concatenate([w.batch for w in taken])
            try:
                logits, embedding = await taken[0].send(batch)
            except asyncio.CancelledError:  # the gateway stops
                for waiting in taken:
                    waiting.answer.cancel()
                raise
            except Exception as exc:  # each of them fails as it would have alone
                for waiting in taken:
                    if not waiting.answer.done():
                        waiting.answer.set_exception(exc)
                return
            start = 0
            for waiting in taken:
                end = start + len(waiting.batch)
                if not waiting.answer.done():
                    rows = embedding[start:end] if embedding is not None else None
                    waiting.answer.set_result((logits[start:end], rows))
                start = end
        finally:
            self._done(key, lane)
