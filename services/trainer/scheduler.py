"""One training per model at a time, and a backlog of newer dataset versions coalesced into the newest.

Each request waits for the training that covers it: the newest request of a backlog gets that training's
event (``model.trained`` or ``model.training_failed``); the older ones get ``None`` (coalesced, nothing to
publish). An exception (a transient failure: the store or MLflow down) reaches every waiter, so their
messages are retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.runtime.tasks import cancel

__all__ = ["Scheduler"]

J = TypeVar("J")
R = TypeVar("R")


@dataclass
class _Slot(Generic[J, R]):
    job: J
    rank: int
    newest: asyncio.Future[R | None]
    coalesced: list[asyncio.Future[R | None]] = field(default_factory=list)


class Scheduler(Generic[J, R]):
    """``submit(key, job, rank)``: jobs of one key run one at a time; a waiting job is replaced by a newer
    (higher ``rank``, e.g. the dataset version) one, whose result answers both."""

    def __init__(self, run: Callable[[J], Awaitable[R]]) -> None:
        self.run = run
        self._waiting: dict[str, _Slot[J, R]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}

    async def submit(self, key: str, job: J, rank: int) -> R | None:
        future: asyncio.Future[R | None] = asyncio.get_running_loop().create_future()
        slot = self._waiting.get(key)
        if slot is None:
            self._waiting[key] = _Slot(job, rank, future)
        elif rank >= slot.rank:  # newer: it replaces the waiting job, which it covers
            self._waiting[key] = _Slot(job, rank, future, [*slot.coalesced, slot.newest])
        else:
            slot.coalesced.append(future)
        if key not in self._workers or self._workers[key].done():
            self._workers[key] = asyncio.create_task(self._drain(key))
        return await future

    def busy(self, key: str) -> bool:
        return key in self._waiting or (key in self._workers and not self._workers[key].done())

    async def _drain(self, key: str) -> None:
        while (slot := self._waiting.pop(key, None)) is not None:
            try:
                result = await self.run(slot.job)
            except Exception as exc:
                for future in (slot.newest, *slot.coalesced):
                    if not future.done():
                        future.set_exception(exc)
                continue
            if not slot.newest.done():
                slot.newest.set_result(result)
            for future in slot.coalesced:
                if not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        for task in self._workers.values():
            await cancel(task)
