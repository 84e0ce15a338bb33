"""The manifest of a dataset version and split assignment by content hash (issue 3, "Splits and duplicates"):
services/ingest/manifest.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter

import pytest

from services.ingest.manifest import SPLITS, FileEntry, Manifest, assign_split
from tests import images

pytestmark = pytest.mark.unit


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


MANY = [md5_of(str(i).encode()) for i in range(20_000)]


def entry(path: str, data: bytes, *, etag: str | None = None, split: str | None = None) -> FileEntry:
    md5 = md5_of(data)
    label = path.split("/", 1)[0]
    return FileEntry(
        path=path,
        label=label,
        md5=md5,
        size=len(data),
        split=split or assign_split(md5),  # type: ignore[arg-type]
        source_key=f"digits/{path}",
        etag=etag or md5,
    )


def digits_manifest(n: int = 40) -> Manifest:
    files = [entry(f"{label}/{name}", data) for label, name, data in images.digits_images(n)]
    return Manifest("digits", 3, {e.path: e for e in files})


# ---- splits --------------------------------------------------------------------------------------------


def test_a_split_depends_on_the_content_hash_alone() -> None:
    for md5 in MANY[:500]:
        split = assign_split(md5)
        assert split in SPLITS
        assert assign_split(md5) == split == assign_split(md5, (80, 10, 10))
    # the digits: the same image bytes give the same split, every time
    for _, _, data in images.digits_images(50):
        assert assign_split(md5_of(data)) == assign_split(md5_of(bytes(data)))


def test_splits_come_close_to_80_10_10() -> None:
    counts = Counter(assign_split(md5) for md5 in MANY)
    assert sum(counts.values()) == len(MANY)
    fractions = {split: counts[split] / len(MANY) for split in SPLITS}
    assert fractions["train"] == pytest.approx(0.80, abs=0.015)
    assert fractions["val"] == pytest.approx(0.10, abs=0.01)
    assert fractions["test"] == pytest.approx(0.10, abs=0.01)


def test_the_real_digits_split_close_to_80_10_10() -> None:
    counts = Counter(assign_split(md5_of(data)) for _, _, data in images.digits_images())
    n = sum(counts.values())
    assert counts["train"] / n == pytest.approx(0.80, abs=0.04)
    assert counts["val"] / n == pytest.approx(0.10, abs=0.03)
    assert counts["test"] / n == pytest.approx(0.10, abs=0.03)


@pytest.mark.parametrize("percentages", [(70, 20, 10), (60, 0, 40), (34, 33, 33), (90, 5, 5)])
def test_other_percentages_are_respected(percentages: tuple[int, int, int]) -> None:
    counts = Counter(assign_split(md5, percentages) for md5 in MANY)
    for split, percent in zip(SPLITS, percentages, strict=True):
        assert counts[split] / len(MANY) == pytest.approx(percent / 100, abs=0.015)
        if percent == 0:
            assert counts[split] == 0


@pytest.mark.parametrize(
    ("percentages", "only"), [((100, 0, 0), "train"), ((0, 100, 0), "val"), ((0, 0, 100), "test")]
)
def test_a_split_of_100_percent_takes_everything(percentages: tuple[int, int, int], only: str) -> None:
    assert {assign_split(md5, percentages) for md5 in MANY[:2000]} == {only}


def test_uppercase_hex_gives_the_same_split() -> None:
    for md5 in MANY[:200]:
        assert assign_split(md5.upper()) == assign_split(md5)


# ---- the manifest --------------------------------------------------------------------------------------


def test_json_round_trip_keeps_files_and_notes() -> None:
    manifest = digits_manifest()
    manifest.files["7/Zelle Ä 日本.png"] = entry("7/Zelle Ä 日本.png", images.gray_png(seed=5), etag="abc-2")
    manifest.notes = {
        "added": 41,
        "removed": 2,
        "rejected": 3,
        "duplicates": [{"md5": "0" * 32, "keys": ["digits/1/a.png", "digits/2/a.png"]}],
        "ingest_seconds": 1.25,
    }
    text = manifest.to_json()
    assert text.endswith("\n")
    back = Manifest.from_json(text)
    assert back == manifest
    assert back.files["7/Zelle Ä 日本.png"].etag == "abc-2"
    assert back.notes["duplicates"][0]["keys"] == ["digits/1/a.png", "digits/2/a.png"]
    assert back.to_json() == text  # stable: the same manifest commits the same bytes


def test_json_is_sorted_by_path_whatever_the_insertion_order() -> None:
    manifest = digits_manifest(20)
    shuffled = list(manifest.files.items())
    random.Random(7).shuffle(shuffled)
    other = Manifest("digits", 3, dict(shuffled))
    assert other.to_json() == manifest.to_json()
    doc = json.loads(manifest.to_json())
    paths = [f["path"] for f in doc["files"]]
    assert paths == sorted(paths)
    assert set(doc) == {"dataset", "version", "notes", "retired", "files"}


def test_a_manifest_without_notes_reads_back_with_empty_notes() -> None:
    doc = json.loads(digits_manifest(3).to_json())
    del doc["notes"]
    back = Manifest.from_json(json.dumps(doc))
    assert back.notes == {} and len(back.files) == 3


def test_an_empty_manifest_round_trips() -> None:
    empty = Manifest("cells")
    back = Manifest.from_json(empty.to_json())
    assert back == empty and back.version == 0
    assert back.label_counts() == {}
    assert back.split_counts() == {"train": 0, "val": 0, "test": 0}
    assert back.total_bytes() == 0


def test_label_and_split_counts() -> None:
    items = images.digits_images(100)
    manifest = digits_manifest(100)
    expected_labels = Counter(label for label, _, _ in items)
    assert manifest.label_counts() == dict(sorted(expected_labels.items()))
    assert list(manifest.label_counts()) == sorted(expected_labels)
    expected_splits = Counter(assign_split(md5_of(data)) for _, _, data in items)
    splits = manifest.split_counts()
    assert list(splits) == ["train", "val", "test"]
    assert splits == {s: expected_splits.get(s, 0) for s in SPLITS}
    assert sum(splits.values()) == 100
    assert manifest.total_bytes() == sum(len(data) for _, _, data in items)


def test_split_counts_follow_the_recorded_split_not_the_hash() -> None:
    data = images.gray_png(seed=1)
    manifest = Manifest(
        "digits",
        1,
        {
            "a/x.png": entry("a/x.png", data, split="test"),
            "b/y.png": entry("b/y.png", images.gray_png(seed=2), split="test"),
        },
    )
    assert manifest.split_counts() == {"train": 0, "val": 0, "test": 2}


def test_source_digest_is_stable_under_ordering_and_follows_key_and_etag() -> None:
    manifest = digits_manifest(30)
    shuffled = list(manifest.files.items())
    random.Random(3).shuffle(shuffled)
    reordered = Manifest("digits", 9, dict(shuffled), notes={"added": 1})
    assert reordered.source_digest() == manifest.source_digest()
    assert len(manifest.source_digest()) == 64
    int(manifest.source_digest(), 16)

    pairs = sorted((e.source_key, e.etag) for e in manifest.files.values())
    assert manifest.source_digest() == hashlib.sha256(json.dumps(pairs).encode()).hexdigest()

    path, first = next(iter(manifest.files.items()))
    changed_etag = Manifest("digits", 3, {**manifest.files, path: _replace(first, etag="other")})
    assert changed_etag.source_digest() != manifest.source_digest()
    changed_key = Manifest(
        "digits", 3, {**manifest.files, path: _replace(first, source_key="digits/x/y.png")}
    )
    assert changed_key.source_digest() != manifest.source_digest()


def test_content_is_path_and_md5_and_by_md5_indexes_files() -> None:
    manifest = digits_manifest(10)
    assert manifest.content() == {(e.path, e.md5) for e in manifest.files.values()}
    # Another etag or source key (a re-upload of the same bytes) is the same content.
    same = Manifest(
        "digits",
        4,
        {
            p: _replace(e, etag="multipart-2", source_key=e.source_key + "x")
            for p, e in manifest.files.items()
        },
    )
    assert same.content() == manifest.content()
    assert set(manifest.by_md5()) == {e.md5 for e in manifest.files.values()}
    for md5, found in manifest.by_md5().items():
        assert found.md5 == md5


def _replace(e: FileEntry, **changes: str) -> FileEntry:
    return dataclasses.replace(e, **changes)  # type: ignore[arg-type]


def test_an_image_that_comes_back_returns_to_its_split() -> None:
    """Removed in one version and uploaded again after the percentages changed: the same split as before."""
    v1 = digits_manifest(20)
    gone = next(iter(v1.files.values()))
    remaining = {path: e for path, e in v1.files.items() if path != gone.path}
    v2 = Manifest("digits", 2, remaining, retired=v1.retired_after(remaining))
    assert v2.retired == {gone.md5: gone.split}
    back = Manifest.from_json(v2.to_json())
    assert back.splits_seen()[gone.md5] == gone.split
    v3 = Manifest("digits", 3, v1.files, retired=v2.retired_after(v1.files))
    assert v3.retired == {}
