"""Ingest against real rclone S3, nats-server and DVC: uploads become versions, bad files are quarantined."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from contracts.events import DatasetRejected, DatasetVersioned
from deploy.local.natsconf import ADMIN_USER
from services.ingest.app import IngestService, build
from services.ingest.config import IngestSettings
from services.runtime.bus import EventBus
from services.runtime.consumer import Delivery
from services.runtime.datasets import S3Remote, fetch_event
from tests import images, minio

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Events:
    """Every dataset.versioned and dataset.rejected of this test's prefix, as they arrive."""

    def __init__(self) -> None:
        self.versioned: list[DatasetVersioned] = []
        self.rejected: list[DatasetRejected] = []

    async def wait(self, predicate: Callable[[], bool], timeout: float = 60) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out; versions={self.versioned} rejected={self.rejected}")
            await asyncio.sleep(0.05)


@pytest.fixture
def ingest_settings(
    nats_server: Any, s3_server: Any, prefix: str, tmp_path: Path
) -> Callable[..., IngestSettings]:
    """Settings for an ingest on this test's own buckets, prefix and state dir, with short windows."""
    client = s3_server.client()
    incoming, quarantine = f"{prefix}-in", f"{prefix}-q"
    for bucket in (incoming, quarantine):
        client.make_bucket(bucket)

    def make(**overrides: Any) -> IngestSettings:
        values: dict[str, Any] = {
            "subject_prefix": prefix,
            "nats_url": nats_server.url,
            "nats_user": "ingest",
            "nats_password": nats_server.passwords["ingest"],
            "s3_endpoint": s3_server.endpoint,
            "s3_access_key": s3_server.access_key,
            "s3_secret_key": s3_server.secret_key,
            "incoming_bucket": incoming,
            "quarantine_bucket": quarantine,
            "state_dir": tmp_path / "state",
            "ingest_quiet_window_s": 0.5,
            "ingest_poll_interval_s": 0.3,
            "retry_base_delay_s": 0.1,
        }
        return IngestSettings(**(values | overrides))

    return make


@pytest.fixture
async def events(nats_server: Any, prefix: str) -> AsyncIterator[Events]:
    seen = Events()

    async def on_versioned(event: DatasetVersioned, _: Delivery) -> None:
        seen.versioned.append(event)

    async def on_rejected(event: DatasetRejected, _: Delivery) -> None:
        seen.rejected.append(event)

    from services.runtime.config import Settings

    bus = EventBus(
        Settings(
            service="tests",
            subject_prefix=prefix,
            nats_url=nats_server.url,
            nats_user=ADMIN_USER,
            nats_password=nats_server.passwords[ADMIN_USER],
        )
    )
    bus.consume(DatasetVersioned, on_versioned, durable="tests-versioned")
    bus.consume(DatasetRejected, on_rejected, durable="tests-rejected", max_in_flight=64)
    async with bus:
        yield seen


def put(client: Minio, bucket: str, key: str, data: bytes) -> None:
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def upload_digits(
    client: Minio, bucket: str, items: list[tuple[str, str, bytes]], dataset: str = "digits"
) -> None:
    for label, name, data in items:
        put(client, bucket, f"{dataset}/{label}/{name}", data)


async def test_uploads_become_versions_and_version_1_comes_back_byte_identical(
    ingest_settings, events, s3_server, tmp_path
):
    settings: IngestSettings = ingest_settings()
    client = s3_server.client()
    digits = images.digits_images()
    first, second = digits[:300], digits[300:360]
    app, _ = build(settings)
    async with app:
        upload_digits(client, settings.incoming_bucket, first)
        await events.wait(lambda: len(events.versioned) == 1)
        upload_digits(client, settings.incoming_bucket, second)
        await events.wait(lambda: len(events.versioned) == 2)
        await asyncio.sleep(1.5)  # several more polls: nothing new may appear
    v1, v2 = events.versioned
    assert (v1.version, v2.version) == (1, 2)
    assert sum(v1.label_counts.values()) == 300 and v1.added == 300 and v1.removed == 0
    assert sum(v2.label_counts.values()) == 360 and v2.added == 60
    assert v1.split_counts.train + v1.split_counts.val + v1.split_counts.test == 300
    assert 0.7 < v1.split_counts.train / 300 < 0.9
    assert v1.dvc_md5.endswith(".dir") and v1.git_rev != v2.git_rev
    assert events.rejected == []

    # Version 1, from a fresh clone of the git remote, after version 2 exists: the same bytes, same splits.
    remote = S3Remote.from_settings(settings)
    files = (await asyncio.to_thread(fetch_event, v1, remote, tmp_path / "c")).files
    originals = {f"{label}/{name}": data for label, name, data in first}
    assert {f.path for f in files} == set(originals)
    for f in files:
        assert f.local_path.read_bytes() == originals[f.path]
    later = (await asyncio.to_thread(fetch_event, v2, remote, tmp_path / "d")).files
    split_of = {f.path: f.split for f in later}
    assert all(split_of[f.path] == f.split for f in files), "an image changed split between versions"


async def test_bad_files_are_quarantined_while_the_good_ones_are_versioned(
    ingest_settings, events, s3_server
):
    settings: IngestSettings = ingest_settings(ingest_max_bytes=200_000)
    client = s3_server.client()
    bucket = settings.incoming_bucket
    good = images.digits_images()[:20]
    microscopy = {  # other good files: every format and depth ingest must take
        "digits/8/rgb.png": images.rgb_png(24, 24, seed=1),
        "digits/8/gray16.tif": images.gray16_tiff(48, 40, seed=2),
        "digits/8/five-channels.tif": images.multichannel_tiff(32, 32, channels=5, seed=3),
        "digits/9/z-stack.tif": images.multipage_tiff(32, 32, pages=4, seed=4),
        "digits/9/photo.jpg": images.jpeg(40, 30, seed=5),
        "digits/9/lzw.tif": images.pillow_tiff(32, 32, seed=6),
    }
    bad = {
        "digits/3/corrupt.png": images.corrupt_png(),
        "digits/3/truncated.png": images.truncated_png(),
        "digits/4/truncated.jpg": images.truncated_jpeg(),
        "digits/4/empty.png": b"",
        "digits/5/oversized.tif": images.gray16_tiff(400, 400),  # 320 kB > 200 kB limit
        "digits/5/bomb.png": images.png_bomb(),
        "digits/5/notes.gif": images.gif(),
        "digits/Bad-Label/x.png": images.gray_png(16, 16),
        "digits/6/deeper/x.png": images.gray_png(16, 16),
        "Not A Dataset/1/x.png": images.gray_png(16, 16),
    }
    app, _ = build(settings)
    async with app:
        upload_digits(client, bucket, good)
        for key, data in (microscopy | bad).items():
            put(client, bucket, key, data)
        await events.wait(lambda: len(events.versioned) == 1 and len(events.rejected) == len(bad))
    [version] = events.versioned
    assert sum(version.label_counts.values()) == 20 + len(microscopy)
    assert version.rejected == len(bad) - 1  # the key that names no valid dataset is reported under "unknown"
    by_key = {r.key: r for r in events.rejected}
    assert set(by_key) == set(bad)
    expected = {
        "digits/3/corrupt.png": "undecodable",
        "digits/3/truncated.png": "undecodable",
        "digits/4/truncated.jpg": "undecodable",
        "digits/4/empty.png": "empty",
        "digits/5/oversized.tif": "too_large",
        "digits/5/bomb.png": "too_many_pixels",
        "digits/5/notes.gif": "unsupported_format",
        "digits/Bad-Label/x.png": "bad_name",
        "digits/6/deeper/x.png": "bad_layout",
    }
    for key, code in expected.items():
        assert by_key[key].reason_code == code, (key, by_key[key].reason)
    assert by_key["Not A Dataset/1/x.png"].dataset == "unknown"
    # each quarantined file sits in the quarantine bucket with its reason beside it
    for rejected in events.rejected:
        note_key = (
            rejected.quarantine_uri.removeprefix(f"s3://{settings.quarantine_bucket}/") + ".reason.json"
        )
        note = json.loads(client.get_object(settings.quarantine_bucket, note_key).read())
        assert note["key"] == rejected.key and note["code"] == rejected.reason_code


async def test_same_content_makes_no_version_and_a_deletion_makes_one(ingest_settings, events, s3_server):
    settings: IngestSettings = ingest_settings()
    client = s3_server.client()
    items = images.digits_images()[:30]
    app, _ = build(settings)
    async with app:
        upload_digits(client, settings.incoming_bucket, items)
        await events.wait(lambda: len(events.versioned) == 1)
        upload_digits(client, settings.incoming_bucket, items[:5])  # the same bytes again
        await asyncio.sleep(2.0)
        assert len(events.versioned) == 1
        label, name, _ = items[0]
        client.remove_object(settings.incoming_bucket, f"digits/{label}/{name}")
        await events.wait(lambda: len(events.versioned) == 2)
    assert events.versioned[1].removed == 1 and sum(events.versioned[1].label_counts.values()) == 29


async def test_duplicates_under_different_labels_are_reported_and_left_out(
    ingest_settings, events, s3_server
):
    settings: IngestSettings = ingest_settings()
    client = s3_server.client()
    items = images.digits_images()[:10]
    twin = images.gray_png(20, 20, seed=7)
    app, _ = build(settings)
    async with app:
        upload_digits(client, settings.incoming_bucket, items)
        put(client, settings.incoming_bucket, "digits/1/twin-a.png", twin)
        put(client, settings.incoming_bucket, "digits/7/twin-b.png", twin)
        await events.wait(lambda: len(events.versioned) == 1)
        client.remove_object(settings.incoming_bucket, "digits/7/twin-b.png")  # the label is clear again
        await events.wait(lambda: len(events.versioned) == 2)
    version, after = events.versioned
    assert sum(version.label_counts.values()) == 10
    [dup] = version.duplicates
    assert dup.keys == ["digits/1/twin-a.png", "digits/7/twin-b.png"]
    assert sum(after.label_counts.values()) == 11 and after.duplicates == [] and after.added == 1


def minio_notification(bucket: str, key: str, etag: str, size: int, sequencer: str) -> bytes:
    """MinIO's notification for one uploaded object (its key URL-encoded, as MinIO sends it)."""
    from urllib.parse import quote_plus

    put = minio.put_record(
        quote_plus(key, safe="/"), bucket=bucket, sequencer=sequencer, eTag=etag, size=size
    )
    return minio.notification(put, key=f"{bucket}/{key}")


async def test_duplicated_and_replayed_minio_notifications_make_no_extra_version(
    ingest_settings, events, s3_server, admin_bus
):
    settings: IngestSettings = ingest_settings(ingest_trigger="minio")
    client = s3_server.client()
    items = images.digits_images()[:40]
    app, service = build(settings)
    async with app:
        notes = []
        for i, (label, name, data) in enumerate(items):
            key = f"digits/{label}/{name}"
            put(client, settings.incoming_bucket, key, data)
            etag = client.stat_object(settings.incoming_bucket, key).etag
            notes.append(minio_notification(settings.incoming_bucket, key, etag, len(data), f"{i + 1:016X}"))
        for note in notes + notes[:10]:  # MinIO sends duplicates, without message ids
            await admin_bus.js.publish(settings.ingest_notify_subject, note)
        await events.wait(lambda: len(events.versioned) == 1)
        for note in notes:  # a replay of the whole history, after the version
            await admin_bus.js.publish(settings.ingest_notify_subject, note)
        await asyncio.sleep(2.0)
        assert await _pending(admin_bus, service) == 0
    assert len(events.versioned) == 1
    assert sum(events.versioned[0].label_counts.values()) == 40


async def _pending(admin_bus: EventBus, service: IngestService) -> int:
    info = await admin_bus.js.consumer_info(
        f"{service.settings.subjects.stream_prefix}_MINIO", "ingest-minio"
    )
    return int(info.num_pending + info.num_ack_pending)
