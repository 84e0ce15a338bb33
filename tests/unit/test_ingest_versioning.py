"""One closed batch becomes at most one dataset version (issue 3, "Validation", "Versioning", "Splits and
duplicates"): services/ingest/versioning.py with in-memory stand-ins for S3, the DVC repository, the known
objects (NATS KV) and the bus."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from contracts.envelope import Event
from contracts.events import DatasetRejected, DatasetVersioned, Duplicate
from services.ingest.batcher import Batch, Batcher
from services.ingest.known import KnownObject
from services.ingest.manifest import Manifest, assign_split
from services.ingest.poller import Poller
from services.ingest.records import ObjectChange
from services.ingest.storage import CHUNK, Listed, TooLarge, copy_hashing
from services.ingest.validation import Limits
from services.ingest.versioning import Ingestor
from tests import images
from tests.fakes import MemoryKnown

pytestmark = pytest.mark.unit

INCOMING, QUARANTINE = "incoming", "quarantine"
LIMITS = Limits(max_bytes=50_000, max_pixels=10_000_000)


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# ---- fakes of the external systems ---------------------------------------------------------------------


class MemoryStore:
    """An S3 store in a dict; the etag of an object is the md5 of its bytes, as S3 gives for a simple PUT."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, bytes]] = defaultdict(dict)

    def put(self, bucket: str, key: str, data: bytes, etag: str | None = None) -> ObjectChange:
        self.buckets[bucket][key] = data
        return ObjectChange(bucket, key, "created", etag=etag or md5_of(data), size=len(data))

    async def list(self, bucket: str) -> list[Listed]:
        objects = self.buckets[bucket]
        return [Listed(key, md5_of(objects[key]), len(objects[key])) for key in sorted(objects)]

    async def download(self, bucket: str, key: str, dest: Path, max_bytes: int) -> tuple[str, int]:
        data = self.buckets[bucket][key]
        return copy_hashing((data[i : i + CHUNK] for i in range(0, len(data), CHUNK)), dest, max_bytes)

    async def quarantine(
        self, bucket: str, key: str, to_bucket: str, to_key: str, reason: Mapping[str, object]
    ) -> str:
        # Like S3Store: the reason first, then the copy (which fails when the object is gone).
        self.buckets[to_bucket][f"{to_key}.reason.json"] = json.dumps(reason).encode()
        self.buckets[to_bucket][to_key] = self.buckets[bucket][key]
        return f"s3://{to_bucket}/{to_key}"

    def reasons(self) -> dict[str, dict[str, Any]]:
        """The quarantine's reason files, by the key of the rejected object."""
        notes = (json.loads(v) for k, v in self.buckets[QUARANTINE].items() if k.endswith(".reason.json"))
        return {note["key"]: note for note in notes}


@dataclass(frozen=True)
class Commit:
    dataset: str
    version: int
    git_rev: str
    dvc_md5: str


class MemoryRepo:
    """The DataRepository Protocol: versions as committed manifests, a cache of staged files, push state."""

    repo_url = "file:///state/ingest/data.git"
    remote_url = "s3://dvc/conveyor"

    def __init__(self) -> None:
        self.cache: dict[str, bytes] = {}
        self.committed: dict[tuple[str, int], str] = {}  # manifest JSON, as git holds it
        self.published: list[tuple[str, int]] = []
        self.fail_publish: Exception | None = None

    def stage_file(self, md5: str, source: Path) -> None:
        data = source.read_bytes()
        assert md5_of(data) == md5, "ingest staged a file under another md5 than its content's"
        self.cache[md5] = data

    def commit_version(self, manifest: Manifest) -> Commit:
        latest = self.latest_version(manifest.dataset)
        if manifest.version != latest + 1:
            raise ValueError(f"{manifest.dataset} is at {latest}, cannot commit {manifest.version}")
        missing = [e.path for e in manifest.files.values() if e.md5 not in self.cache]
        assert not missing, f"committed files were never staged: {missing}"
        self.committed[(manifest.dataset, manifest.version)] = manifest.to_json()
        return self.version_commit(manifest.dataset, manifest.version)

    def publish(self, dataset: str, version: int) -> None:
        if (dataset, version) not in self.committed:
            raise LookupError(f"{dataset}/v{version} is not committed")
        if self.fail_publish is not None:
            raise self.fail_publish
        if (dataset, version) not in self.published:
            self.published.append((dataset, version))

    def latest_version(self, dataset: str) -> int:
        return max((v for d, v in self.committed if d == dataset), default=0)

    def read_manifest(self, dataset: str, version: int | None = None) -> Manifest | None:
        version = self.latest_version(dataset) if version is None else version
        text = self.committed.get((dataset, version))
        return Manifest.from_json(text) if text else None

    def datasets(self) -> list[str]:
        return sorted({d for d, _ in self.committed})

    def recover(self) -> list[tuple[str, int]]:
        return sorted(key for key in self.committed if key not in self.published)

    def version_commit(self, dataset: str, version: int) -> Commit:
        manifest = Manifest.from_json(self.committed[(dataset, version)])
        rev = hashlib.sha1(f"{dataset}/v{version}".encode(), usedforsecurity=False).hexdigest()
        dvc_md5 = md5_of(json.dumps(sorted(manifest.content())).encode()) + ".dir"
        return Commit(dataset, version, rev, dvc_md5)

    def data(self, dataset: str, version: int | None = None) -> dict[str, bytes]:
        """The files of a version, by path, as a consumer gets them."""
        manifest = self.read_manifest(dataset, version)
        assert manifest is not None
        return {path: self.cache[e.md5] for path, e in manifest.files.items()}


class Bus:
    """The events ingest published, in order; ``fail`` makes the next publish raise (the bus is down)."""

    def __init__(self, repo: MemoryRepo) -> None:
        self.repo = repo
        self.events: list[Event] = []
        self.published_at_event: list[list[tuple[str, int]]] = []
        self.fail: Exception | None = None

    async def __call__(self, event: Event) -> None:
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        self.events.append(event)
        self.published_at_event.append(list(self.repo.published))

    @property
    def versioned(self) -> list[DatasetVersioned]:
        return [e for e in self.events if isinstance(e, DatasetVersioned)]

    @property
    def rejected(self) -> list[DatasetRejected]:
        return [e for e in self.events if isinstance(e, DatasetRejected)]


@dataclass
class World:
    store: MemoryStore
    repo: MemoryRepo
    known: MemoryKnown
    bus: Bus
    ingestor: Ingestor
    work_dir: Path

    def ingestor_with(self, **kwargs: Any) -> Ingestor:
        return make_ingestor(self.repo, self.store, self.known, self.bus, self.work_dir, **kwargs)

    def upload(self, items: list[tuple[str, str, bytes]], dataset: str = "digits") -> list[ObjectChange]:
        return [self.store.put(INCOMING, f"{dataset}/{label}/{name}", data) for label, name, data in items]

    def remove(self, key: str) -> ObjectChange:
        del self.store.buckets[INCOMING][key]
        return ObjectChange(INCOMING, key, "removed")


def make_ingestor(
    repo: MemoryRepo, store: MemoryStore, known: MemoryKnown, bus: Bus, work_dir: Path, **kwargs: Any
) -> Ingestor:
    return Ingestor(
        repo,
        store,
        known,  # type: ignore[arg-type]
        bus,
        incoming_bucket=INCOMING,
        quarantine_bucket=QUARANTINE,
        limits=kwargs.pop("limits", LIMITS),
        work_dir=work_dir,
        **kwargs,
    )


@pytest.fixture
def world(tmp_path: Path) -> World:
    store, repo, known = MemoryStore(), MemoryRepo(), MemoryKnown()
    bus = Bus(repo)
    return World(store, repo, known, bus, make_ingestor(repo, store, known, bus, tmp_path), tmp_path)


def batch(changes: list[ObjectChange], dataset: str | None = None) -> Batch:
    name = dataset or changes[0].dataset_token
    assert all(c.dataset_token == name for c in changes)
    return Batch(name, {c.key: c for c in changes})


DIGITS = images.digits_images(60)


# ---- versions ------------------------------------------------------------------------------------------


async def test_a_batch_of_good_files_makes_version_1(world: World) -> None:
    changes = world.upload(DIGITS)
    result = await world.ingestor.process(batch(changes))

    assert result.version == 1 and result.rejected == []
    assert world.repo.published == [("digits", 1)]
    [event] = world.bus.events
    assert event is result.event and isinstance(event, DatasetVersioned)
    assert world.bus.published_at_event == [[("digits", 1)]]  # pushed before it was announced
    commit = world.repo.version_commit("digits", 1)
    assert (event.dataset, event.version, event.git_rev, event.dvc_md5) == (
        "digits",
        1,
        commit.git_rev,
        commit.dvc_md5,
    )
    assert (event.repo_url, event.remote_url) == (MemoryRepo.repo_url, MemoryRepo.remote_url)
    assert event.label_counts == dict(sorted(Counter(label for label, _, _ in DIGITS).items()))
    splits = Counter(assign_split(md5_of(data)) for _, _, data in DIGITS)
    assert event.split_counts.model_dump() == {s: splits.get(s, 0) for s in ("train", "val", "test")}
    assert event.total_bytes == sum(len(data) for _, _, data in DIGITS)
    assert (event.added, event.removed, event.rejected, event.duplicates) == (len(DIGITS), 0, 0, [])
    assert event.ingest_seconds >= 0

    manifest = world.repo.read_manifest("digits", 1)
    assert manifest is not None
    assert event.source_digest == manifest.source_digest()
    for (label, name, data), change in zip(DIGITS, changes, strict=True):
        entry = manifest.files[f"{label}/{name}"]
        assert (entry.label, entry.md5, entry.size) == (label, md5_of(data), len(data))
        assert (entry.source_key, entry.etag) == (change.key, change.etag)
        assert entry.split == assign_split(entry.md5)
    assert world.repo.data("digits", 1) == {f"{label}/{name}": data for label, name, data in DIGITS}
    assert manifest.notes["added"] == len(DIGITS) and manifest.notes["rejected"] == 0

    # The known objects hold every object of the version, written after it was pushed; the version is
    # marked announced.
    assert set(world.known.objects) == {c.key for c in changes}
    for change in changes:
        assert world.known.objects[change.key] == KnownObject(
            change.key, change.etag, "digits", "versioned", 1
        )
    assert world.known.marks == {"digits": 1}
    assert list(world.work_dir.iterdir()) == []  # downloads are cleaned up


async def test_a_second_upload_makes_version_2_with_the_added_count(world: World) -> None:
    first, second = images.digits_images(80)[:50], images.digits_images(80)[50:]
    await world.ingestor.process(batch(world.upload(first)))
    result = await world.ingestor.process(batch(world.upload(second)))

    assert result.version == 2
    v1, v2 = world.bus.versioned
    assert (v2.added, v2.removed, v2.rejected) == (30, 0, 0)
    assert sum(v2.label_counts.values()) == 80
    assert v2.total_bytes == sum(len(d) for _, _, d in first + second)
    assert world.repo.published == [("digits", 1), ("digits", 2)]
    assert world.known.marks == {"digits": 2}
    assert world.known.objects["digits/" + "/".join(first[0][:2])].version == 1  # first held by v1
    assert world.known.objects["digits/" + "/".join(second[0][:2])].version == 2
    # Version 1 is still what it was.
    assert world.repo.data("digits", 1) == {f"{label}/{name}": data for label, name, data in first}
    assert v1.source_digest != v2.source_digest


async def test_datasets_are_versioned_apart(world: World) -> None:
    await world.ingestor.process(batch(world.upload(DIGITS[:5])))
    cells = [("mitosis", "a.tif", images.gray16_tiff(seed=1)), ("other", "b.tif", images.multipage_tiff())]
    result = await world.ingestor.process(batch(world.upload(cells, "cells")))
    assert result.version == 1
    assert world.repo.datasets() == ["cells", "digits"]
    assert world.bus.versioned[-1].label_counts == {"mitosis": 1, "other": 1}
    assert world.known.marks == {"digits": 1, "cells": 1}


# ---- validation ----------------------------------------------------------------------------------------


BAD_FILES = {
    "digits/3/garbage.png": (images.garbage(), "unsupported_format"),
    "digits/3/empty.png": (images.empty(), "empty"),
    "digits/3/bomb.png": (images.png_bomb(), "too_many_pixels"),
    "digits/3/truncated.png": (images.truncated_png(), "undecodable"),
    "digits/3/notes.csv": (images.text(), "unsupported_format"),
    "digits/3/huge.png": (images.rgb_png(200, 200), "too_large"),
    "digits/7/../escape.png": (images.gray_png(), "bad_key"),
    "digits/7/tab\there.png": (images.gray_png(seed=1), "bad_key"),
    "digits/7/bad\ufffdutf8.png": (images.gray_png(seed=2), "bad_key"),
    "digits/7/.DS_Store": (b"\x00\x00\x00\x01Bud1", "bad_key"),
    "digits/flat.png": (images.gray_png(seed=3), "bad_layout"),
    "digits/Bad_Label/x.png": (images.gray_png(seed=4), "bad_name"),
}


async def test_bad_files_are_quarantined_while_the_good_ones_are_versioned(world: World) -> None:
    good = world.upload(DIGITS[:20])
    bad = [world.store.put(INCOMING, key, data) for key, (data, _) in BAD_FILES.items()]
    result = await world.ingestor.process(batch(good + bad))

    assert result.version == 1
    assert {r.key: r.reason_code for r in result.rejected} == {k: code for k, (_, code) in BAD_FILES.items()}
    assert {r.key for r in world.bus.rejected} == set(BAD_FILES)
    assert world.bus.events[-1] is result.event  # rejections first, the version last
    [version] = world.bus.versioned
    assert version.rejected == len(BAD_FILES) and version.added == 20
    assert world.repo.data("digits", 1) == {f"{label}/{name}": data for label, name, data in DIGITS[:20]}

    reasons = world.store.reasons()
    for event in world.bus.rejected:
        data, code = BAD_FILES[event.key]
        assert event.dataset == "digits" and event.bucket == INCOMING
        assert event.etag == md5_of(data)
        assert event.reason, "every rejection says why"
        assert event.quarantine_uri.startswith(f"s3://{QUARANTINE}/digits/")
        copied = event.quarantine_uri.removeprefix(f"s3://{QUARANTINE}/")
        assert world.store.buckets[QUARANTINE][copied] == data  # the file, byte for byte
        assert reasons[event.key]["code"] == code and reasons[event.key]["reason"] == event.reason
        assert reasons[event.key]["etag"] == md5_of(data)
        # quarantine names are plain: no '..', no control characters, one level under the dataset
        assert "/" not in copied.removeprefix("digits/") and ".." not in copied.split("/")
        assert copied.isprintable()
    huge = next(e for e in world.bus.rejected if e.key == "digits/3/huge.png")
    assert huge.size_bytes is not None and huge.size_bytes > LIMITS.max_bytes

    # Rejected objects are known (the poller does not bring them again), versioned ones too.
    for key in BAD_FILES:
        known = world.known.objects[key]
        assert (known.status, known.version, known.dataset) == ("rejected", 0, "digits")
    assert sum(k.status == "versioned" for k in world.known.objects.values()) == 20


async def test_a_batch_of_only_bad_files_makes_no_version(world: World) -> None:
    bad = [world.store.put(INCOMING, "digits/1/a.png", images.garbage())]
    result = await world.ingestor.process(batch(bad))
    assert result.version is None and result.event is None
    assert [e.reason_code for e in world.bus.events] == ["unsupported_format"]  # type: ignore[attr-defined]
    assert world.repo.committed == {} and world.known.marks == {}
    assert world.known.objects["digits/1/a.png"].status == "rejected"


async def test_keys_that_name_no_dataset_are_rejected_under_unknown(world: World) -> None:
    bad_name = [world.store.put(INCOMING, "Bad_Set/1/a.png", images.gray_png())]
    loose = [world.store.put(INCOMING, "loose.png", images.gray_png(seed=1))]
    r1 = await world.ingestor.process(batch(bad_name, "Bad_Set"))
    r2 = await world.ingestor.process(batch(loose, "loose.png"))
    assert r1.version is None and r2.version is None
    assert [(e.dataset, e.key, e.reason_code) for e in world.bus.rejected] == [
        ("unknown", "Bad_Set/1/a.png", "bad_name"),
        ("unknown", "loose.png", "bad_layout"),
    ]
    assert all(e.quarantine_uri.startswith(f"s3://{QUARANTINE}/unknown/") for e in world.bus.rejected)
    assert world.repo.committed == {}
    assert world.known.objects["loose.png"].status == "rejected"


async def test_an_object_gone_before_quarantine_is_still_reported(world: World) -> None:
    change = world.store.put(INCOMING, "digits/7/.hidden.png", images.gray_png())
    del world.store.buckets[INCOMING][change.key]  # deleted before ingest got to it
    result = await world.ingestor.process(batch([change]))
    [rejected] = result.rejected
    assert rejected.reason_code == "bad_key"
    assert rejected.quarantine_uri.endswith(".reason.json")  # the reason at least is there
    assert world.store.reasons()[change.key]["code"] == "bad_key"


# ---- the same content, removals, duplicates --------------------------------------------------------------


async def test_the_same_content_again_makes_no_version(world: World) -> None:
    changes = world.upload(DIGITS[:30])
    await world.ingestor.process(batch(changes))
    events = len(world.bus.events)

    replay = await world.ingestor.process(batch(changes))  # a replayed notification, the same etags
    assert replay.version is None and replay.event is None
    assert len(world.bus.events) == events
    assert world.repo.latest_version("digits") == 1 and world.repo.published == [("digits", 1)]
    assert world.known.marks == {"digits": 1}


async def test_re_uploading_identical_bytes_makes_no_version(world: World) -> None:
    changes = world.upload(DIGITS[:10])
    await world.ingestor.process(batch(changes))
    # The same bytes uploaded again, e.g. as a multipart upload: another etag, the same content.
    again = [
        world.store.put(INCOMING, c.key, world.store.buckets[INCOMING][c.key], etag="x-2") for c in changes
    ]
    result = await world.ingestor.process(batch(again))
    assert result.version is None
    assert world.repo.latest_version("digits") == 1 and len(world.bus.versioned) == 1


async def test_re_uploading_identical_bytes_records_the_new_etag(world: World) -> None:
    [change] = world.upload(DIGITS[:1])
    await world.ingestor.process(batch([change]))
    again = world.store.put(INCOMING, change.key, world.store.buckets[INCOMING][change.key], etag="x-2")
    await world.ingestor.process(batch([again]))
    assert world.known.objects[change.key].etag == "x-2"


async def test_objects_the_version_holds_are_remembered_when_brought_again(world: World) -> None:
    changes = world.upload(DIGITS[:5])
    await world.ingestor.process(batch(changes))
    world.known.objects.clear()  # e.g. the KV bucket was recreated
    result = await world.ingestor.process(batch(changes))
    assert result.version is None
    assert set(world.known.objects) == {c.key for c in changes}


async def test_an_overwritten_file_makes_a_version_with_its_new_content(world: World) -> None:
    changes = world.upload(DIGITS[:5])
    await world.ingestor.process(batch(changes))
    key = changes[0].key
    new = world.store.put(INCOMING, key, images.gray_png(32, 32, seed=42))
    result = await world.ingestor.process(batch([new]))
    assert result.version == 2
    manifest = world.repo.read_manifest("digits", 2)
    assert manifest is not None and len(manifest.files) == 5
    [entry] = [e for e in manifest.files.values() if e.source_key == key]
    assert (entry.md5, entry.etag) == (md5_of(images.gray_png(32, 32, seed=42)), new.etag)
    assert world.known.objects[key].etag == new.etag and world.known.objects[key].version == 2


async def test_a_removal_makes_a_version_without_the_file(world: World) -> None:
    changes = world.upload(DIGITS[:10])
    await world.ingestor.process(batch(changes))
    gone = world.remove(changes[3].key)
    result = await world.ingestor.process(batch([gone]))

    assert result.version == 2
    event = world.bus.versioned[-1]
    assert (event.added, event.removed, event.rejected) == (0, 1, 0)
    assert sum(event.label_counts.values()) == 9
    manifest = world.repo.read_manifest("digits", 2)
    assert manifest is not None
    assert gone.key not in {e.source_key for e in manifest.files.values()}
    assert len(world.repo.data("digits", 1)) == 10  # version 1 keeps it
    assert gone.key not in world.known.objects and len(world.known.objects) == 9

    # Removing what no version holds changes nothing.
    again = await world.ingestor.process(batch([world.remove(changes[4].key), gone]))
    assert again.version == 3  # changes[4] was versioned: it goes
    nothing = await world.ingestor.process(batch([ObjectChange(INCOMING, "digits/1/never.png", "removed")]))
    assert nothing.version is None and world.repo.latest_version("digits") == 3


async def test_identical_content_under_two_labels_is_reported_and_left_out(world: World) -> None:
    twin = images.gray_png(seed=99)
    good = world.upload(DIGITS[:10])
    dup = world.upload([("1", "twin-a.png", twin), ("2", "twin-b.png", twin)])
    same_label = world.upload(
        [("5", "copy-1.png", images.gray_png(seed=7)), ("5", "copy-2.png", images.gray_png(seed=7))]
    )
    result = await world.ingestor.process(batch(good + dup + same_label))

    assert result.version == 1
    [event] = world.bus.versioned
    assert event.duplicates == [
        Duplicate(md5=md5_of(twin), keys=["digits/1/twin-a.png", "digits/2/twin-b.png"])
    ]
    manifest = world.repo.read_manifest("digits", 1)
    assert manifest is not None
    paths = set(manifest.files)
    assert "1/twin-a.png" not in paths and "2/twin-b.png" not in paths
    assert {"5/copy-1.png", "5/copy-2.png"} <= paths  # the same image twice under one label is no conflict
    assert event.added == 12 and sum(event.label_counts.values()) == 12
    assert manifest.notes["duplicates"] == [d.model_dump() for d in event.duplicates]
    for change in dup:
        known = world.known.objects[change.key]
        assert (known.status, known.etag) == ("left_out", change.etag)
    assert world.bus.rejected == []  # a duplicate is not a bad file


async def test_a_duplicate_of_a_versioned_image_under_another_label_leaves_both_out(world: World) -> None:
    first = world.upload(DIGITS[:5])
    await world.ingestor.process(batch(first))
    label, name, data = DIGITS[0]
    other_label = "9" if label != "9" else "8"
    [copy] = world.upload([(other_label, "copy.png", data)])
    result = await world.ingestor.process(batch([copy]))
    assert result.version == 2
    event = world.bus.versioned[-1]
    assert event.duplicates[0].keys == sorted([f"digits/{label}/{name}", copy.key])
    manifest = world.repo.read_manifest("digits", 2)
    assert manifest is not None and len(manifest.files) == 4
    assert event.removed == 1  # its label is now ambiguous: out of the version


async def test_a_left_out_twin_is_versioned_once_its_duplicate_is_removed(world: World) -> None:
    twin = images.gray_png(seed=99)
    a, b = world.upload([("1", "twin-a.png", twin), ("2", "twin-b.png", twin)])
    await world.ingestor.process(batch([*world.upload(DIGITS[:3]), a, b]))
    world.remove(a.key)  # the operator deletes the wrongly labelled copy
    batcher = Batcher(quiet_s=0, max_batch=10_000)
    poller = Poller(world.store, world.known, batcher, INCOMING, 1.0)  # type: ignore[arg-type]
    for _ in range(3):
        await poller.poll_once()
        for closed in batcher.due(flush=True):
            await world.ingestor.process(closed)
            batcher.done(closed)
    manifest = world.repo.read_manifest("digits")
    assert manifest is not None and manifest.version == 2 and "2/twin-b.png" in manifest.files
    assert manifest.files["2/twin-b.png"].split == assign_split(md5_of(twin))
    event = world.bus.versioned[-1]
    assert (event.version, event.added, event.duplicates) == (2, 1, [])
    assert world.known.objects[b.key].status == "versioned" and a.key not in world.known.objects
    assert await poller.poll_once() == 0  # settled


async def test_an_unrelated_removal_keeps_both_twins_out(world: World) -> None:
    twin = images.gray_png(seed=99)
    good = world.upload(DIGITS[:3])
    twins = world.upload([("1", "twin-a.png", twin), ("2", "twin-b.png", twin)])
    await world.ingestor.process(batch([*good, *twins]))
    result = await world.ingestor.process(batch([world.remove(good[0].key)]))
    assert result.version == 2
    event = world.bus.versioned[-1]
    assert (event.added, event.removed) == (0, 1)
    assert [d.keys for d in event.duplicates] == [[t.key for t in twins]]  # still reported
    manifest = world.repo.read_manifest("digits", 2)
    assert manifest is not None and set(manifest.files) == {f"{lb}/{n}" for lb, n, _ in DIGITS[1:3]}
    assert all(world.known.objects[t.key].status == "left_out" for t in twins)


# ---- splits --------------------------------------------------------------------------------------------


async def test_an_image_keeps_its_split_when_the_percentages_change(world: World) -> None:
    first = images.digits_images(120)[:100]
    await world.ingestor.process(batch(world.upload(first)))
    v1 = world.repo.read_manifest("digits", 1)
    assert v1 is not None
    assert {e.split for e in v1.files.values()} == {"train", "val", "test"}

    everything_to_test = world.ingestor_with(split=(0, 0, 100))
    new = images.digits_images(120)[100:]
    renamed = [(label, f"renamed-{name}", data) for label, name, data in first[:10]]  # same bytes, new key
    result = await everything_to_test.process(batch(world.upload(new + renamed)))
    assert result.version == 2
    v2 = world.repo.read_manifest("digits", 2)
    assert v2 is not None
    for path, entry in v1.files.items():
        assert v2.files[path].split == entry.split  # unchanged
    for label, name, _ in first[:10]:
        assert v2.files[f"{label}/renamed-{name}"].split == v1.files[f"{label}/{name}"].split
    for label, name, _ in new:
        assert v2.files[f"{label}/{name}"].split == "test"  # new images follow the new percentages
    assert world.bus.versioned[-1].split_counts.test == v1.split_counts()["test"] + len(new) + sum(
        1 for label, name, _ in first[:10] if v1.files[f"{label}/{name}"].split == "test"
    )


# ---- failures and recovery -------------------------------------------------------------------------------


async def test_a_failing_publish_raises_and_remembers_nothing(world: World) -> None:
    changes = world.upload(DIGITS[:10])
    world.repo.fail_publish = OSError("dvc push: connection refused")
    with pytest.raises(OSError, match="connection refused"):
        await world.ingestor.process(batch(changes))
    assert world.repo.latest_version("digits") == 1  # committed...
    assert world.repo.published == []  # ...not pushed
    assert world.bus.versioned == []  # not announced
    assert world.known.objects == {} and world.known.marks == {}  # the trigger brings the objects again


async def test_a_failing_bus_raises_and_remembers_nothing(world: World) -> None:
    changes = world.upload(DIGITS[:10])
    world.bus.fail = ConnectionError("nats: no servers available")
    with pytest.raises(ConnectionError):
        await world.ingestor.process(batch(changes))
    assert world.repo.published == [("digits", 1)]
    assert world.known.objects == {} and world.known.marks == {}


async def test_a_retry_after_a_failing_publish_publishes_and_announces(world: World) -> None:
    changes = world.upload(DIGITS[:10])
    world.repo.fail_publish = OSError("dvc push: connection refused")
    with pytest.raises(OSError):
        await world.ingestor.process(batch(changes))
    world.repo.fail_publish = None
    await world.ingestor.process(batch(changes))  # the poller / JetStream brings the batch again
    assert world.repo.published == [("digits", 1)]
    assert [e.version for e in world.bus.versioned] == [1]
    assert world.known.marks == {"digits": 1} and len(world.known.objects) == 10


async def test_recover_publishes_and_announces_a_committed_version(world: World) -> None:
    changes = world.upload(DIGITS[:10])
    bad = world.store.put(INCOMING, "digits/1/bad.png", images.garbage())
    world.repo.fail_publish = OSError("crash")
    with pytest.raises(OSError):
        await world.ingestor.process(batch([*changes, bad]))
    world.repo.fail_publish = None

    restarted = world.ingestor_with()
    [event] = await restarted.recover()
    assert world.repo.published == [("digits", 1)]
    assert world.bus.versioned == [event]
    assert world.bus.published_at_event[-1] == [("digits", 1)]  # pushed, then announced
    assert (event.version, event.added, event.rejected) == (1, 10, 1)  # the committed notes
    manifest = world.repo.read_manifest("digits", 1)
    assert manifest is not None and event.source_digest == manifest.source_digest()
    assert event.git_rev == world.repo.version_commit("digits", 1).git_rev
    assert world.known.marks == {"digits": 1}
    assert {k for k, o in world.known.objects.items() if o.status == "versioned"} == {c.key for c in changes}

    assert await restarted.recover() == []  # exactly once
    assert len(world.bus.versioned) == 1


async def test_recover_announces_a_pushed_but_unannounced_version_once(world: World) -> None:
    await world.ingestor.process(batch(world.upload(DIGITS[:5])))
    changes = world.upload(DIGITS[5:15])
    world.bus.fail = ConnectionError("crash before the event went out")
    with pytest.raises(ConnectionError):
        await world.ingestor.process(batch(changes))
    assert world.repo.published == [("digits", 1), ("digits", 2)] and world.known.marks == {"digits": 1}

    restarted = world.ingestor_with()
    [event] = await restarted.recover()
    assert (event.dataset, event.version, event.added) == ("digits", 2, 10)
    assert world.repo.published == [("digits", 1), ("digits", 2)]  # nothing pushed twice
    assert world.known.marks == {"digits": 2}
    assert all(world.known.objects[c.key].version == 2 for c in changes)
    assert await restarted.recover() == []
    assert [e.version for e in world.bus.versioned] == [1, 2]


async def test_recover_with_nothing_to_do_sends_nothing(world: World) -> None:
    assert await world.ingestor.recover() == []
    await world.ingestor.process(batch(world.upload(DIGITS[:3])))
    await world.ingestor.process(batch(world.upload(DIGITS[:3], "cells")))
    assert await world.ingestor.recover() == []
    assert len(world.bus.versioned) == 2


@pytest.mark.parametrize("chunks", [0, 1, 2, 5])
def test_copy_hashing_writes_and_hashes_files_of_any_number_of_chunks(tmp_path: Path, chunks: int) -> None:
    """One chunk is written without the writer thread, more with it: the same bytes and md5 either way."""
    data = bytes(range(256)) * (chunks * 1000)
    parts = [data[i * 256_000 : (i + 1) * 256_000] for i in range(chunks)]
    dest = tmp_path / "copy"
    assert copy_hashing(iter(parts), dest, len(data)) == (md5_of(data), len(data))
    assert dest.read_bytes() == data
    if chunks:
        with pytest.raises(TooLarge):
            copy_hashing(iter(parts), tmp_path / "small", len(data) - 1)
