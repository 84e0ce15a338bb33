"""A continuous JetStream pull consumer (what nats.go calls ``Consume``) on top of nats-py.

Why not faststream's pull subscriber or ``PullSubscription.fetch``: a fetch of N waits until N messages
arrived or the fetch times out, so one message alone waits the whole timeout; a fetch of 1 costs a round trip
per message. Here one long-lived request for up to ``max_in_flight`` messages stays open at the server, every
message is handed to its handler the moment it arrives, and more are asked for as handlers finish, so the
latency of a single event is one hop and a backlog flows at full speed with bounded concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator, Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError

__all__ = ["PullConsumer", "ensure_consumer", "read_through"]

_EXPIRES_S = 10.0  # a pull request lives this long at the server, then is renewed
_HEARTBEAT_S = 2.0  # the server says it is alive this often while a request waits


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    """Create the durable consumer, or keep the existing one (its delivery state is what matters)."""
    try:
        await js.add_consumer(stream, config)
    except BadRequestError:
        # Exists with another configuration (e.g. an older ack_wait): update what may be updated.
        info = await js.consumer_info(stream, config.durable_name or "")
        if info.config.filter_subject != config.filter_subject:
            raise RuntimeError(
                f"consumer {config.durable_name} on {stream} filters {info.config.filter_subject!r}, "
                f"not {config.filter_subject!r}: delete it (`nats consumer rm`) or choose another durable"
            ) from None


async def read_through(
    js: JetStreamContext, stream: str, subject: str, config: ConsumerConfig, *, batch: int = 512
) -> AsyncGenerator[Msg, None]:
    """The messages of ``subject`` that ``config`` selects (its deliver policy), oldest first, up to the
    newest one there when the read began: an ephemeral consumer that acks nothing, deleted at the end.

    nats-py's ``watchall()`` and ``keys()`` mark the end from a consumer-info snapshot taken while the server
    already pushes messages; on a busy machine that marker can come first and a listing ends empty. A pull
    consumer delivers nothing until asked, so the pending count it reports is exact, and the read ends when a
    message says none is left.
    """
    config = dataclasses.replace(
        config,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=60.0,  # the server removes it should this task die before the delete
        mem_storage=True,
    )
    sub = await js.pull_subscribe(subject, stream=stream, config=config)
    name = None
    try:
        info = await sub.consumer_info()
        name, remaining = info.name, info.num_pending or 0
        while remaining > 0:
            for msg in await sub.fetch(min(remaining, batch), timeout=10):
                remaining = msg.metadata.num_pending
                yield msg
    finally:
        await sub.unsubscribe()
        if name is not None:
            with contextlib.suppress(Exception):  # gone already: the inactivity threshold covers it
                await js.delete_consumer(stream, name)


class PullConsumer:
    """Feeds messages of one durable consumer to ``handler``, at most ``max_in_flight`` at a time."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        durable: str,
        handler: Callable[[Msg], Awaitable[None]],
        *,
        max_in_flight: int = 16,
    ) -> None:
        self.nc = nc
        self.handler = handler
        self.max_in_flight = max_in_flight
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._requested = 0  # asked for, not yet received
        self._handling = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self._inbox = ""
        self._watchdog: asyncio.Task[None] | None = None
        self._last_seen = 0.0
        self._stopping = False

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_message)
        self._last_seen = asyncio.get_running_loop().time()
        self._watchdog = asyncio.create_task(self._watch())
        await self._pull()

    async def stop(self, timeout: float = 15.0) -> None:
        """Stop asking for messages and let the handlers in flight finish (unfinished ones come again)."""
        self._stopping = True
        if self._watchdog:
            self._watchdog.cancel()
        if self._sub:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    async def _pull(self) -> None:
        free = self.max_in_flight - self._handling - self._requested
        # Ask in chunks of at least half the window, so a backlog costs few requests.
        if self._stopping or free <= 0 or (free < self.max_in_flight // 2 and self._requested > 0):
            return
        self._requested += free
        request = {
            "batch": free,
            "expires": int(_EXPIRES_S * 1e9),
            "idle_heartbeat": int(_HEARTBEAT_S * 1e9),
        }
        await self.nc.publish(self._next_subject, json.dumps(request).encode(), reply=self._inbox)

    async def _on_message(self, msg: Msg) -> None:
        self._last_seen = asyncio.get_running_loop().time()
        headers = msg.headers or {}
        status = headers.get("Status")  # nats-py puts a status line's code here
        if status is not None or not msg.reply:
            if status in ("408", "409"):  # request expired or cancelled: what it still owed is not coming
                owed = headers.get("Nats-Pending-Messages")
                self._requested = max(0, self._requested - int(owed)) if owed else 0
                await self._pull()
            return  # heartbeats (100) and other statuses need nothing
        self._requested = max(0, self._requested - 1)
        self._handling += 1
        task = asyncio.create_task(self._run(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, msg: Msg) -> None:
        try:
            await self.handler(msg)
        finally:
            self._handling -= 1
            await self._pull()

    async def _watch(self) -> None:
        """Renew the request if the server went quiet (restart, lost request), so consuming never stalls."""
        while not self._stopping:
            await asyncio.sleep(_HEARTBEAT_S)
            quiet = asyncio.get_running_loop().time() - self._last_seen
            if quiet > 3 * _HEARTBEAT_S:
                self._requested = 0
                self._last_seen = asyncio.get_running_loop().time()
                await self._pull()
