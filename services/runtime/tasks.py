"""Stopping a background task for sure.

Python 3.11's ``asyncio.wait_for`` (used inside nats-py's fetch and next_msg) loses a cancellation that
arrives as the awaited future completes: the task goes on as if never cancelled, and ``await task`` after one
``cancel()`` can wait forever (a service that never stops; seen as a test hanging at shutdown). ``cancel``
asks again until the task is done.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["cancel"]


async def cancel(task: asyncio.Task[object] | None, *, every_s: float = 0.5) -> None:
    """Cancel ``task`` and wait until it is done, cancelling again every ``every_s`` seconds."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
