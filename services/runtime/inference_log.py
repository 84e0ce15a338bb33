"""Sampled, batched ``inference.logged`` publishing that never blocks or fails a request.

The gateway calls ``sampled()`` to decide whether to compute a sample at all, and ``log()`` to hand one over;
``log`` only appends to a bounded in-memory buffer. A background task publishes a batch per model when it is
full or ``flush_interval_s`` has passed. When NATS is slow or down the buffer fills and further samples are
dropped and counted (``conveyor_inference_samples_dropped``): a request never waits for the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import defaultdict

from prometheus_client import Counter

from contracts.events import InferenceLogged, InferenceSample
from services.runtime.bus import EventBus
from services.runtime.telemetry import get_logger

__all__ = ["InferenceLogger"]


class InferenceLogger:
    def __init__(
        self,
        bus: EventBus,
        *,
        sample_rate: float = 1.0,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        max_buffered: int = 50_000,
    ) -> None:
        self.bus = bus
        self.sample_rate = sample_rate
        self.rates: dict[str, float] = {}  # models sampled at their own policy's rate
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_buffered = max_buffered
        self._buffers: dict[str, list[InferenceSample]] = defaultdict(list)
        self._buffered = 0
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self.log_ = get_logger(service=bus.settings.service, component="inference-log")
        registry = bus.metrics.registry
        self.dropped = Counter(
            "conveyor_inference_samples_dropped",
            "Samples dropped because the buffer was full",
            registry=registry,
        )
        self.published = Counter(
            "conveyor_inference_samples_published", "Samples published in inference.logged", registry=registry
        )

    def sampled(self, model: str | None = None, rate: float | None = None) -> bool:
        """Whether this request should be logged (decide before computing its statistics); ``rate``
        overrides the logger's for ``model`` (its own policy), and its batches say so."""
        if rate is None:
            rate = self.sample_rate
        elif model is not None:
            self.rates[model] = rate
        return rate >= 1.0 or random.random() < rate

    def log(self, model: str, sample: InferenceSample) -> bool:
        """Buffer one sample; False (and counted) when the buffer is full. Never blocks.

        The gateway builds samples from values it computed itself, so ``InferenceSample.model_construct``
        (no validation) is the cheap and sufficient way to make one; the monitor validates on receipt.
        """
        if self._buffered >= self.max_buffered:
            self.dropped.inc()
            return False
        buffer = self._buffers[model]
        buffer.append(sample)
        self._buffered += 1
        if len(buffer) >= self.batch_size:
            self._full.set()
        return True

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Publish what is buffered, then stop."""
        # A flag, not Task.cancel(): wait_for swallows a cancel that races with the event being set.
        self._stopping = True
        self._full.set()
        if self._task:
            await self._task
        self._flush(force=True)
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=10)

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.flush_interval_s)
            self._full.clear()
            self._flush(force=True)

    def _flush(self, *, force: bool) -> None:
        for model, buffer in list(self._buffers.items()):
            while buffer and (force or len(buffer) >= self.batch_size):
                batch, self._buffers[model] = buffer[: self.batch_size], buffer[self.batch_size :]
                buffer = self._buffers[model]
                task = asyncio.create_task(self._publish(model, batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    async def _publish(self, model: str, batch: list[InferenceSample]) -> None:
        event = InferenceLogged(
            model=model,
            batch_id=uuid.uuid4().hex,
            sample_rate=self.rates.get(model, self.sample_rate),
            samples=batch,
        )
        try:
            await self.bus.publish(event)
            self.published.inc(len(batch))
        except Exception as exc:  # the bus is slow or down: drop, count, never raise into a request
            self.dropped.inc(len(batch))
            self.log_.warning("inference batch dropped", model=model, samples=len(batch), error=repr(exc))
        finally:
            self._buffered -= len(batch)
