"""One training per model at a time; a backlog coalesced into the newest request."""

from __future__ import annotations

import asyncio

import pytest

from services.trainer.scheduler import Scheduler

pytestmark = pytest.mark.unit


async def test_a_backlog_waiting_behind_a_running_job_is_coalesced_into_the_newest() -> None:
    release = asyncio.Event()
    ran: list[int] = []

    async def run(version: int) -> str:
        ran.append(version)
        if version == 1:
            await release.wait()
        return f"trained on {version}"

    scheduler: Scheduler[int, str] = Scheduler(run)
    first = asyncio.create_task(scheduler.submit("digits", 1, 1))
    await asyncio.sleep(0)  # job 1 starts and blocks
    await asyncio.sleep(0)
    backlog = [asyncio.create_task(scheduler.submit("digits", v, v)) for v in (2, 4, 3)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(first, *backlog)
    assert ran == [1, 4]  # 2 and 3 were covered by 4, the newest
    assert results == ["trained on 1", None, "trained on 4", None]


async def test_models_train_independently_and_one_at_a_time_each() -> None:
    running: dict[str, int] = {"a": 0, "b": 0}
    most = 0

    async def run(job: tuple[str, int]) -> int:
        nonlocal most
        running[job[0]] += 1
        most = max(most, max(running.values()))
        await asyncio.sleep(0.01)
        running[job[0]] -= 1
        return job[1]

    scheduler: Scheduler[tuple[str, int], int] = Scheduler(run)
    jobs = [scheduler.submit(m, (m, v), v) for v in (1, 2) for m in ("a", "b")]
    results = await asyncio.gather(*jobs)
    assert most == 1
    assert sorted(r for r in results if r is not None) == [2, 2]


async def test_a_failure_reaches_every_waiter_so_their_messages_are_retried() -> None:
    async def run(version: int) -> str:
        raise ConnectionError("MLflow is down")

    scheduler: Scheduler[int, str] = Scheduler(run)
    results = await asyncio.gather(
        scheduler.submit("digits", 1, 1), scheduler.submit("digits", 2, 2), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionError) for r in results)
    assert not scheduler.busy("digits")
