"""The event path across a real nats-server: delivery, retries, dead letters, duplicates, permissions."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import pytest
from nats.js.api import ConsumerConfig, StreamConfig

from contracts.envelope import encode
from contracts.events import DatasetVersioned, ModelPromoted, ModelTrained
from contracts.examples import example_event
from contracts.names import Subjects, durable_name, inbox_prefix
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.consumer import Delivery
from services.runtime.deadletters import list_dead_letters, replay
from services.runtime.errors import PermanentError
from services.runtime.streams import NotProvisioned, notification_stream

pytestmark = pytest.mark.integration


def handled(bus: EventBus, outcome: str, event_type: str = "model.trained") -> float:
    """How many messages ``bus`` finished with this outcome (ack, retry, dead_letter), from its metrics."""
    return float(bus.metrics.consumed.labels(bus.settings.service, event_type, outcome)._value.get())


def trained(version: int = 1) -> ModelTrained:
    return example_event(ModelTrained).model_copy(update={"version": version})


@contextlib.asynccontextmanager
async def logged_in_as(service: str, nats_server: Any) -> AsyncIterator[tuple[nats.NATS, list[str]]]:
    """A raw nats-py connection as ``service``'s user, and the permission violations NATS reports to it
    (lower-cased; each names the subject it refused)."""
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refused.append(str(exc).lower())

    nc = await nats.connect(**nats_server.connect_kwargs(service), error_cb=on_error)
    try:
        yield nc, refused
    finally:
        await nc.close()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_event_published_by_one_service_is_consumed_by_another(service_settings):
    received: list[tuple[ModelTrained, Delivery]] = []

    async def on_trained(event: ModelTrained, delivery: Delivery) -> None:
        received.append((event, delivery))

    registry = EventBus(service_settings("registry"))
    registry.consume(ModelTrained, on_trained)
    async with registry, EventBus(service_settings("trainer")) as trainer:
        sent = trained(7)
        await trainer.publish(sent)
        await wait_for(lambda: len(received) == 1)
    event, delivery = received[0]
    assert event == sent
    assert delivery.envelope.source == "conveyor/trainer"
    assert delivery.envelope.id == sent.event_id()
    assert delivery.subject.endswith(".model.trained.digits")


async def test_transient_failure_is_redelivered_then_acked(service_settings, admin_bus):
    deliveries: list[int] = []

    async def flaky(event: ModelTrained, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        if delivery.num_delivered < 3:
            raise ConnectionError("MLflow is restarting")

    registry = EventBus(service_settings("registry", max_deliveries=5))
    registry.consume(ModelTrained, flaky)
    async with registry, EventBus(service_settings("trainer")) as trainer:
        await trainer.publish(trained())
        await wait_for(lambda: deliveries == [1, 2, 3])
        await asyncio.sleep(0.3)  # nothing more arrives once acked
    assert deliveries == [1, 2, 3]
    assert await list_dead_letters(admin_bus.js, admin_bus.subjects) == []
    consumed = handled(registry, "ack")
    assert consumed == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not JSON"),
        (b'{"specversion": "1.0"}', "not a CloudEvents 1.0 envelope"),
        (
            b'{"specversion":"1.0","id":"x","source":"s","type":"model.trained","time":"2026-01-01T00:00:00Z",'
            b'"data":{"model":"Digits!","version":0}}',
            "invalid model.trained data",
        ),
    ],
)
async def test_invalid_message_goes_to_dead_letters_at_once(service_settings, admin_bus, payload, reason):
    calls = 0

    async def handler(event: ModelTrained, delivery: Delivery) -> None:
        nonlocal calls
        calls += 1

    registry = EventBus(service_settings("registry"))
    registry.consume(ModelTrained, handler)
    async with registry:
        await admin_bus.js.publish(f"{admin_bus.subjects.prefix}.model.trained.digits", payload)
        await wait_for(lambda: handled(registry, "dead_letter") == 1)
    letters = await list_dead_letters(admin_bus.js, admin_bus.subjects)
    assert calls == 0
    assert len(letters) == 1
    record = letters[0].record
    assert record.kind == "invalid" and reason in record.reason
    assert record.num_delivered == 1 and record.service == "registry"
    assert record.original_payload() == payload


async def test_permanent_error_goes_to_dead_letters_at_once(service_settings, admin_bus):
    async def handler(event: ModelTrained, delivery: Delivery) -> None:
        raise PermanentError("dataset digits@9 does not exist")

    registry = EventBus(service_settings("registry"))
    registry.consume(ModelTrained, handler)
    async with registry, EventBus(service_settings("trainer")) as trainer:
        await trainer.publish(trained())
        await wait_for(lambda: handled(registry, "dead_letter") == 1)
    [letter] = await list_dead_letters(admin_bus.js, admin_bus.subjects)
    assert letter.record.kind == "permanent"
    assert "digits@9 does not exist" in letter.record.reason


async def test_poison_message_reaches_dead_letters_after_bounded_deliveries_and_replays(
    service_settings, admin_bus
):
    deliveries: list[int] = []
    healed = False

    async def handler(event: ModelTrained, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        if not healed:
            raise RuntimeError("CUDA error: device-side assert triggered")

    registry = EventBus(service_settings("registry", max_deliveries=3))
    registry.consume(ModelTrained, handler)
    async with registry, EventBus(service_settings("trainer")) as trainer:
        await trainer.publish(trained(3))
        await wait_for(lambda: handled(registry, "dead_letter") == 1)
        assert deliveries == [1, 2, 3]
        [letter] = await list_dead_letters(admin_bus.js, admin_bus.subjects)
        assert letter.record.kind == "transient"
        assert "failed 3 deliveries" in letter.record.reason and "device-side assert" in letter.record.reason
        assert letter.record.event_id == trained(3).event_id()

        healed = True  # the operator fixed the cause; now the dead letter is sent back
        result = await replay(admin_bus.js, admin_bus.subjects, letter.id)
        assert result["subject"].endswith(".model.trained.digits")
        await wait_for(lambda: handled(registry, "ack") == 1)
    assert deliveries == [1, 2, 3, 1]
    assert await list_dead_letters(admin_bus.js, admin_bus.subjects) == []
    with pytest.raises(LookupError, match="no dead letter"):
        await replay(admin_bus.js, admin_bus.subjects, letter.id)


async def test_duplicate_publish_with_the_same_event_id_is_dropped(service_settings):
    received: list[int] = []

    async def handler(event: ModelTrained, delivery: Delivery) -> None:
        received.append(event.version)

    registry = EventBus(service_settings("registry"))
    registry.consume(ModelTrained, handler)
    async with registry, EventBus(service_settings("trainer")) as trainer:
        first = await trainer.publish(trained(1))
        again = await trainer.publish(trained(1))  # e.g. retried after a crash before the ack
        other = await trainer.publish(trained(2))
        await wait_for(lambda: len(received) == 2)
        await asyncio.sleep(0.3)
    assert not first.duplicate and again.duplicate and not other.duplicate
    assert again.seq == first.seq
    assert sorted(received) == [1, 2]


async def test_handler_result_is_published_as_the_next_event(service_settings):
    """A subscriber returns the event it causes; the runtime publishes it before acking."""
    promoted: list[ModelPromoted] = []
    template = example_event(ModelPromoted)

    async def registry_gate(event: ModelTrained, delivery: Delivery) -> ModelPromoted:
        return template.model_copy(update={"model": event.model, "version": event.version})

    async def serving(event: ModelPromoted, delivery: Delivery) -> None:
        promoted.append(event)

    registry = EventBus(service_settings("registry"))
    registry.consume(ModelTrained, registry_gate)
    serving_bus = EventBus(service_settings("serving"))
    serving_bus.consume(ModelPromoted, serving)
    async with registry, serving_bus, EventBus(service_settings("trainer")) as trainer:
        await trainer.publish(trained(4))
        await wait_for(lambda: len(promoted) == 1)
    assert promoted[0].version == 4


async def test_service_user_cannot_publish_outside_its_permissions(nats_server, prefix, admin_bus):
    async with logged_in_as("ingest", nats_server) as (nc, refused):
        js = nc.jetstream()
        own = await js.publish(f"{prefix}.dataset.versioned.digits", b"{}", timeout=2)
        assert own.seq >= 1  # its own event type is allowed
        with pytest.raises(nats.errors.Error):
            await js.publish(f"{prefix}.model.promoted.digits", b"{}", timeout=1)
        await asyncio.sleep(0.2)
        assert any(f'"{prefix}.model.promoted.digits"' in message for message in refused)


async def test_service_users_cannot_create_change_or_destroy_streams(nats_server, prefix, admin_bus):
    """Every service reads the streams and manages its consumers, but none may make a stream, change one's
    limits (which could drop what it holds) or destroy what a stream holds."""
    stream = admin_bus.settings.subjects.dlq_stream
    await admin_bus.js.publish(f"{prefix}.dlq.serving", b"a dead letter", timeout=2)
    async with logged_in_as("serving", nats_server) as (nc, refused):
        js = nc.jetstream(timeout=1)
        info = await js.stream_info(stream)
        assert info.state.messages == 1  # reading is allowed
        shrunk = dataclasses.replace(info.config, max_msgs=0, max_age=1.0)
        attempts = (
            js.add_stream(StreamConfig(name=f"{prefix}_MINE", subjects=[f"{prefix}.mine.>"])),
            js.update_stream(shrunk),
            js.purge_stream(stream),
            js.delete_msg(stream, 1),
            js.delete_stream(stream),
        )
        for attempt in attempts:
            with pytest.raises(nats.errors.Error):
                await attempt
        await asyncio.sleep(0.2)
        verbs = ("update", "purge", "msg.delete", "delete")
        targets = (f"create.{prefix}_mine", *(f"{verb}.{stream.lower()}" for verb in verbs))
        for target, message in zip(targets, refused, strict=True):
            assert f'"$js.api.stream.{target}"' in message
    after = await admin_bus.js.stream_info(stream)
    assert after.state.messages == 1 and after.config.max_age == info.config.max_age


async def test_a_service_cannot_read_ack_create_or_delete_another_services_durable(nats_server, admin_bus):
    """The registry's durable consumer is the registry's: the ingest user may neither take its messages,
    ack one it delivered, delete it, recreate it nor read its state; it may read the stream through a
    consumer of its own."""
    durable = durable_name("registry", ModelTrained.type)
    stream, subject = admin_bus.subjects.control_stream, admin_bus.subjects.event_filter(ModelTrained.type)
    await admin_bus.publish(trained(1))
    await admin_bus.publish(trained(2))  # what the ingest user's fetch would take
    held = await admin_bus.js.pull_subscribe(subject, durable, stream=stream)
    (delivered,) = await held.fetch(1, timeout=5)  # in flight, not acked: the ingest user tries to ack it
    async with logged_in_as("ingest", nats_server) as (nc, refused):
        js = nc.jetstream(timeout=1)
        with pytest.raises(nats.errors.TimeoutError):
            await (await js.pull_subscribe_bind(durable, stream)).fetch(1, timeout=1)
        await nc.publish(delivered.reply, b"+ACK")
        config = ConsumerConfig(durable_name=durable, filter_subject=subject)
        attempts = (
            js.consumer_info(stream, durable),
            js.delete_consumer(stream, durable),
            js.add_consumer(stream, dataclasses.replace(config, name=durable)),
            js.add_consumer(stream, config),  # nats-py's older request: CONSUMER.DURABLE.CREATE
        )
        for attempt in attempts:
            with pytest.raises(nats.errors.Error):
                await attempt
        mine = await js.pull_subscribe(subject, stream=stream)  # an ephemeral consumer: reading is allowed
        assert [m.data for m in await mine.fetch(1, timeout=5)] == [delivered.data]
        await mine.unsubscribe()
        await nc.flush()
        messages = " ".join(refused)
        for verb in ("msg.next", "info", "delete", "create", "durable.create"):
            assert f"$js.api.consumer.{verb}.{stream.lower()}.{durable}" in messages, verb
        assert f'"{delivered.reply.lower()}"' in messages
    info = await admin_bus.js.consumer_info(stream, durable)
    assert (info.num_ack_pending, info.num_pending) == (1, 1)
    assert info.delivered.stream_seq == delivered.metadata.sequence.stream


async def test_a_service_cannot_have_jetstream_deliver_a_forged_event(nats_server, prefix, admin_bus):
    """JetStream delivers a push consumer's messages to any subject with a plain subscriber, or with a
    stream of that one literal subject, without checking the consumer creator's publish rights there
    (nats-server#8274). The trainer writes its own KV bucket, so it could have a forged ``model.promoted``
    delivered from it. It cannot: it may subscribe to its own inbox only and list no consumers (which
    would show other services' inboxes), and MinIO's notification stream takes a wildcard subject."""
    subjects = admin_bus.subjects
    bucket = f"KV_{subjects.kv.trainer}"
    promoted = subjects.event(ModelPromoted.type, "digits")  # the registry's event
    notified = f"{prefix}.minio.events"  # MinIO's
    async with logged_in_as("trainer", nats_server) as (nc, refused):
        js = nc.jetstream(timeout=1)
        _, forged = encode(example_event(ModelPromoted), "conveyor/registry")
        await (await js.key_value(subjects.kv.trainer)).put("digits", forged)
        for subject in (promoted, "_INBOX.>", f"{inbox_prefix('registry')}.>"):
            await nc.subscribe(subject)
        with pytest.raises(nats.errors.Error):
            await js.consumers_info(bucket)
        for subject in (promoted, notified):  # JetStream lets it make these
            await js.add_consumer(bucket, ConsumerConfig(deliver_subject=subject))
        await asyncio.sleep(2)
        messages = " ".join(refused)
        for subject in (promoted, "_inbox.>", "_inbox_registry.>"):
            assert f'subscription to "{subject}"' in messages, subject
        assert f"$js.api.consumer.list.{bucket.lower()}" in messages
    for stream in (subjects.control_stream, notification_stream(subjects)):
        assert (await admin_bus.js.stream_info(stream)).state.messages == 0, stream


async def test_only_the_admin_user_provisions_the_streams(nats_server, tmp_path):
    """A service on a prefix nobody provisioned stops, saying what to run; `conveyor streams` (as admin)
    makes the streams, MinIO's too with the minio trigger; then the service starts and leaves their limits
    alone."""
    fresh = "t" + secrets.token_hex(4)  # not the ``prefix`` fixture's: nothing provisions it
    trainer = Settings(
        service="trainer",
        subject_prefix=fresh,
        nats_url=nats_server.url,
        nats_user="trainer",
        nats_password=nats_server.passwords["trainer"],
        inference_max_bytes=8 * 1024**2,
    )
    bus = EventBus(trainer)
    try:
        with pytest.raises(NotProvisioned, match=r"may not create streams.*`conveyor streams`"):
            await bus.prepare()
    finally:
        await bus.broker.stop()

    env = os.environ | {
        "CONVEYOR_NATS_URL": nats_server.url,
        "CONVEYOR_NATS_USER": "admin",
        "CONVEYOR_NATS_PASSWORD": nats_server.passwords["admin"],
        "CONVEYOR_SUBJECT_PREFIX": fresh,
        "CONVEYOR_STATE_DIR": str(tmp_path / "state"),
        "CONVEYOR_INGEST_TRIGGER": "minio",
    }
    command = [sys.executable, "-m", "deploy.local.cli", "streams"]
    out = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    subjects = Subjects(fresh)
    for name in (
        subjects.control_stream,
        subjects.inference_stream,
        subjects.kv.rollout,
        f"{fresh.upper()}_MINIO",
    ):
        assert f"ready: {name}" in out.stdout

    async with EventBus(trainer) as bus:  # provisioned: it starts, and checks without changing anything
        info = await bus.js.stream_info(subjects.inference_stream)
        assert (
            info.config.max_bytes
            == int(os.environ["CONVEYOR_INFERENCE_MAX_BYTES"])
            != trainer.inference_max_bytes
        )
        minio = await bus.js.stream_info(f"{fresh.upper()}_MINIO")
        assert minio.config.subjects == [f"{fresh}.minio.*"]  # no single literal subject: see streams.py


async def test_dataset_event_filter_by_name(service_settings):
    """A consumer can follow one name only; others are not delivered to it."""
    seen: list[str] = []

    async def handler(event: DatasetVersioned, delivery: Delivery) -> None:
        seen.append(event.dataset)

    trainer = EventBus(service_settings("trainer"))
    trainer.consume(DatasetVersioned, handler, name="cells", durable="trainer-cells-only")
    base: Any = example_event(DatasetVersioned)
    async with trainer, EventBus(service_settings("ingest")) as ingest:
        await ingest.publish(base.model_copy(update={"dataset": "digits"}))
        await ingest.publish(base.model_copy(update={"dataset": "cells"}))
        await wait_for(lambda: seen == ["cells"])
        await asyncio.sleep(0.3)
    assert seen == ["cells"]
