"""Bus benchmark: Conveyor's event path against raw nats-py JetStream, side by side on one nats-server.

Prints one JSON line:
- control-event latency publish -> handled with one message in flight (target p50 <= 2 ms);
- control-event throughput with 256 in flight, Conveyor vs raw nats-py (target ratio >= 0.3);
- inference samples per second through the batched logging path (target >= 50,000).

Run: ``.venv/bin/python bench/bus.py [--messages 5000] [--samples 200000]`` (``make bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.events import InferenceLogged, InferenceSample, ModelTrained
from contracts.examples import example_event
from deploy.local.natsconf import ADMIN_USER
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.inference_log import InferenceLogger
from tests.servers import run_nats

WINDOW = 256


def progress(stage: str) -> None:
    print(f"bench/bus.py: {stage} ...", file=sys.stderr, flush=True)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def settings(server: Any, service: str, prefix: str) -> Settings:
    return Settings(
        service=service,
        subject_prefix=prefix,
        nats_url=server.url,
        nats_user=ADMIN_USER,
        nats_password=server.passwords[ADMIN_USER],
        otlp_endpoint=None,
    )


def trained(version: int) -> ModelTrained:
    return example_event(ModelTrained).model_copy(update={"version": version})


async def conveyor_latency(server: Any, n: int) -> list[float]:
    got: asyncio.Queue[float] = asyncio.Queue()

    async def handler(event: ModelTrained, _: object) -> None:
        got.put_nowait(time.perf_counter())

    async with (
        EventBus(settings(server, "registry", "lat")) as sub,
        EventBus(settings(server, "trainer", "lat")) as pub,
    ):
        sub.consume(ModelTrained, handler)
        await sub.start_consumers()
        out = []
        for version in range(1, n + 1):
            started = time.perf_counter()
            await pub.publish(trained(version))
            out.append((await got.get()) - started)
    return out[10:]  # the first few warm the connection and consumer


async def conveyor_throughput(server: Any, n: int) -> float:
    window = asyncio.Semaphore(WINDOW)
    done = asyncio.Event()
    handled = 0

    async def handler(event: ModelTrained, _: object) -> None:
        nonlocal handled
        handled += 1
        window.release()
        if handled == n:
            done.set()

    async with (
        EventBus(settings(server, "registry", "thr")) as sub,
        EventBus(settings(server, "trainer", "thr")) as pub,
    ):
        sub.consume(ModelTrained, handler, max_in_flight=WINDOW)
        await sub.start_consumers()
        events = [trained(v) for v in range(1, n + 1)]
        started = time.perf_counter()

        async def send(event: ModelTrained) -> None:
            await pub.publish(event)

        tasks = set()
        for event in events:
            await window.acquire()
            task = asyncio.create_task(send(event))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await done.wait()
        return n / (time.perf_counter() - started)


async def raw_throughput(server: Any, n: int) -> float:
    """The same work with nats-py alone: JSON bodies of the same size, js.publish, fetch + ack."""
    nc = await nats.connect(server.url, user=ADMIN_USER, password=server.passwords[ADMIN_USER])
    js = nc.jetstream()
    await js.add_stream(name="RAW", subjects=["raw.>"])
    body = [json.dumps({"i": v, "pad": "x" * 1200}).encode() for v in range(n)]
    sub = await js.pull_subscribe("raw.>", durable="raw")
    window = asyncio.Semaphore(WINDOW)
    handled = 0

    async def consume() -> None:
        nonlocal handled
        while handled < n:
            try:
                msgs = await sub.fetch(batch=WINDOW, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                json.loads(msg.data)
                await msg.ack()
                handled += 1
                window.release()

    async def send(i: int) -> None:
        await js.publish("raw.event", body[i], headers={"Nats-Msg-Id": f"raw-{i}"})

    consumer = asyncio.create_task(consume())
    started = time.perf_counter()
    tasks = set()
    for i in range(n):
        await window.acquire()
        task = asyncio.create_task(send(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await consumer
    rate = n / (time.perf_counter() - started)
    await nc.close()
    return rate


async def inference_rate(server: Any, n: int) -> float:
    received = 0
    done = asyncio.Event()

    async def handler(event: InferenceLogged, _: object) -> None:
        nonlocal received
        received += len(event.samples)
        if received >= n:
            done.set()

    async with (
        EventBus(settings(server, "monitor", "inf")) as sub,
        EventBus(settings(server, "serving", "inf")) as pub,
    ):
        sub.consume(InferenceLogged, handler, max_in_flight=8)
        await sub.start_consumers()
        logger = InferenceLogger(pub, batch_size=1000, max_buffered=n)
        await logger.start()
        fields = dict(example_event(InferenceLogged).samples[0])
        now = datetime.now(UTC)
        started = time.perf_counter()
        for i in range(n):
            # A gateway builds samples from values it computed itself: construct, don't re-validate.
            fields.update(prediction_id=f"p{i}", time=now)
            logger.log("digits", InferenceSample.model_construct(**fields))
            if i % 5000 == 0:
                await asyncio.sleep(0)  # a gateway yields between requests
        await logger.stop()
        await done.wait()
        return n / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, run_nats(Path(tmp)) as server:
        progress("latency, one event in flight")
        latency = await conveyor_latency(server, args.latency_messages)
        progress(f"throughput of raw nats-py, {WINDOW} in flight")
        raw = await raw_throughput(server, args.messages)
        progress(f"throughput of Conveyor, {WINDOW} in flight")
        ours = await conveyor_throughput(server, args.messages)
        progress("batched inference logging")
        samples = await inference_rate(server, args.samples)
    return {
        "bench": "bus",
        "latency_p50_ms": round(percentile(latency, 50) * 1000, 3),
        "latency_p99_ms": round(percentile(latency, 99) * 1000, 3),
        "throughput_in_flight": WINDOW,
        "throughput_conveyor_per_s": round(ours),
        "throughput_raw_nats_per_s": round(raw),
        "throughput_ratio": round(ours / raw, 3),
        "inference_samples_per_s": round(samples),
        "targets": {"latency_p50_ms": 2.0, "throughput_ratio": 0.3, "inference_samples_per_s": 50000},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000, help="control events per throughput run")
    parser.add_argument("--latency-messages", type=int, default=500, help="events in the latency run")
    parser.add_argument("--samples", type=int, default=200_000, help="inference samples to log")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
