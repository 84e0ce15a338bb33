"""The monitor against the real nats-server and MLflow, with a model the trainer's pipeline trained: the
reference profile comes from the version's MLflow run, and the traffic is what the gateway logs for images
run through that model (``tests.traffic``: the gateway's own preprocessing, the TorchScript in-process)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contracts.events import CanaryVerdict, DriftCleared, DriftDetected, InferenceLogged
from contracts.kv import DriftPolicy, ModelPolicy, RolloutState
from deploy.local.natsconf import ADMIN_USER
from services.monitor.app import build
from services.monitor.config import MonitorSettings
from services.monitor.state import MonitorState
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from tests import traffic
from tests.flows import Seen

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW = 150  # distinct held-out images per window (the test split has ~180)


@pytest.fixture
async def world(
    nats_server: Any, mlflow_server: Any, prefix: str, tmp_path: Path
) -> AsyncIterator[tuple[MonitorSettings, EventBus, Seen]]:
    common: dict[str, Any] = {
        "subject_prefix": prefix,
        "nats_url": nats_server.url,
        "mlflow_url": mlflow_server.url,
        "state_dir": tmp_path / "state",
    }
    settings = MonitorSettings(
        **common, nats_user="monitor", nats_password=nats_server.passwords["monitor"], monitor_tick_s=0.2
    )
    admin = Settings(
        **common, service="tests", nats_user=ADMIN_USER, nats_password=nats_server.passwords[ADMIN_USER]
    )
    seen = Seen()

    bus = EventBus(admin)
    for cls in (DriftDetected, DriftCleared, CanaryVerdict):
        bus.consume(cls, seen.collect, durable=f"tests-{cls.type.replace('.', '-')}")
    async with bus:
        yield settings, bus, seen


async def apply(bus: EventBus, policy: ModelPolicy) -> None:
    kv = await bus.js.key_value(bus.subjects.kv.policy)
    await kv.put(policy.model, policy.model_dump_json().encode())


async def route(bus: EventBus, state: RolloutState) -> None:
    kv = await bus.js.key_value(bus.subjects.kv.rollout)
    await kv.put(state.model, state.model_dump_json().encode())


async def send(bus: EventBus, model: str, samples: list, feedback: list | None = None) -> None:
    await bus.publish(
        InferenceLogged(
            model=model,
            batch_id=f"b{random.getrandbits(64):x}",
            sample_rate=1.0,
            samples=samples,
            feedback=feedback or [],
        )
    )


async def windowed(bus: EventBus, trained: Any) -> tuple[str, int, traffic.Traffic, list[bytes]]:
    """The trained model with windows of ``WINDOW`` samples, no cooldown; its traffic; held-out images."""
    event, local = trained
    await apply(
        bus,
        ModelPolicy(model=event.model, drift=DriftPolicy(window_size=WINDOW, min_samples=100, cooldown_s=0)),
    )
    held_out = [data for _, data in traffic.held_out("test")]
    assert len(held_out) >= WINDOW
    return event.model, event.version, traffic.Traffic(local, event.version), held_out


async def test_held_out_traffic_stays_quiet_and_every_shift_is_detected(world, trained):
    settings, bus, seen = world
    model, version, live, held_out = await windowed(bus, trained)
    rng = random.Random(7)
    state = MonitorState(lambda: bus.js, bus.subjects.kv.monitor)

    async def windows(images: list[bytes]) -> list[Any]:
        """Send one window's worth of samples; the version's kept windows once the monitor closed it."""
        kept = (await state.get(model)).versions.get(version)
        closed = kept.closed if kept else 0
        await send(bus, model, live.samples(images))
        deadline = asyncio.get_running_loop().time() + 60
        while (kept := (await state.get(model)).versions.get(version)) is None or kept.closed == closed:
            assert asyncio.get_running_loop().time() < deadline, "the window never closed"
            await asyncio.sleep(0.1)
        return kept.windows

    app, _ = build(settings)
    async with app:
        outcomes = []
        for _ in range(20):
            kept = await windows(rng.sample(held_out, WINDOW))
            outcomes.append(kept[-1])
        quiet = [w for w in outcomes if w.outcome == "clear"]
        print({t.name: [w.tests[i].statistic for w in outcomes] for i, t in enumerate(outcomes[0].tests)})
        assert len(quiet) >= 19, [(w.outcome, [t.name for t in w.tests if t.drifted]) for w in outcomes]
        for name, shift in {
            "brightness": traffic.brighter,
            "blur": traffic.blurred,
            "rotation": traffic.rotated,
        }.items():
            first = (await windows([shift(d) for d in rng.sample(held_out, WINDOW)]))[-1]
            second = (await windows([shift(d) for d in rng.sample(held_out, WINDOW)]))[-1]
            print(name, [(t.name, t.statistic, t.p_value) for t in first.tests])
            assert "drift" in (first.outcome, second.outcome), (name, first, second)
            await windows(rng.sample(held_out, WINDOW))  # back to normal: drift.cleared
        unseen = (await windows(traffic.letters(WINDOW)))[-1]
        print("letters", [(t.name, t.statistic, t.p_value) for t in unseen.tests])
        assert unseen.outcome == "drift"
        await seen.wait(lambda: len(seen.of(DriftDetected)) >= 4 and len(seen.of(DriftCleared)) >= 3)

        # A long cooldown: a stream that keeps drifting raises no new event (one per cooldown, not a storm).
        await apply(bus, ModelPolicy(model=model, drift=DriftPolicy(window_size=WINDOW, min_samples=100)))
        detected = len(seen.of(DriftDetected))
        for _ in range(2):
            assert (await windows(traffic.letters(WINDOW, seed=5)))[-1].outcome == "drift"
        await asyncio.sleep(1)
        assert len(seen.of(DriftDetected)) == detected
    alarms = seen.of(DriftDetected)
    assert all(e.model == model and e.version == version for e in alarms)
    assert {t.name for e in alarms for t in e.tests if t.drifted} >= {
        "ks.mean",
        "ks.sharpness",
        "mmd.embedding",
    }
    assert all(e.severity in ("medium", "high") for e in alarms)
    cleared = seen.of(DriftCleared)
    assert all(c.drifted_since is not None and not any(t.drifted for t in c.tests) for c in cleared)
    # Each window's statistics are MLflow metrics on the version's run: drift over time.
    from mlflow import MlflowClient

    history = MlflowClient(settings.mlflow_url).get_metric_history(trained[0].run_id, "drift.ks.mean")
    assert len(history) >= 29 and sorted(m.step for m in history)[-1] >= 29


async def test_a_restart_loses_none_of_the_open_window(world, trained):
    """The samples of the window open at a restart come back from the inference stream before the consumer
    starts: the window closes with all of them, and the samples of the window closed before count once."""
    settings, bus, _ = world
    model, version, live, held_out = await windowed(bus, trained)
    held_out = held_out[:WINDOW]
    state = MonitorState(lambda: bus.js, bus.subjects.kv.monitor)
    stream = bus.subjects.inference_stream
    loop = asyncio.get_running_loop()

    async def until(condition: Any, what: str) -> None:
        deadline = loop.time() + 60
        while not await condition():
            assert loop.time() < deadline, what
            await asyncio.sleep(0.1)

    async def all_acked(durable: str) -> bool:
        last = (await bus.js.stream_info(stream)).state.last_seq
        floor = (await bus.js.consumer_info(stream, durable)).ack_floor
        return floor is not None and floor.stream_seq >= last

    async def closed(n: int) -> bool:
        kept = (await state.get(model)).versions.get(version)
        return kept is not None and kept.closed >= n

    app, service = build(settings)
    async with app:
        await send(bus, model, live.samples(held_out))  # one whole window: it closes
        await until(lambda: closed(1), "the first window never closed")
        await send(bus, model, live.samples(held_out[:90]))  # the next one, still open at the restart
        await until(lambda: all_acked(service.consumer.durable), "the monitor did not ack every batch")
        assert service.monitor.windows[(model, version)].count == 90
    app, service = build(settings)
    async with app:
        assert service.monitor.windows[(model, version)].count == 90  # rebuilt before any new batch
        await send(bus, model, live.samples(held_out[90:]))
        await until(lambda: closed(2), "the window open at the restart never closed")
    kept = (await state.get(model)).versions[version]
    assert [w.samples for w in kept.windows] == [WINDOW, WINDOW]
    assert kept.windows[1].outcome == "clear"
