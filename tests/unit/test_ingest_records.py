"""MinIO bucket notifications become object changes (issue 3, "Triggers"): services/ingest/records.py."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from contracts.envelope import InvalidEvent
from services.ingest.records import ObjectChange, parse_minio_notification
from tests.minio import notification as _notification
from tests.minio import put_record as _put
from tests.minio import record as _record

pytestmark = pytest.mark.unit


def test_a_put_notification_is_one_created_change() -> None:
    raw = _notification(_put("digits%2F7%2Fimg-001.png", sequencer="17B2C5A3F1E0D4A1"))
    assert parse_minio_notification(raw) == [
        ObjectChange(
            bucket="incoming",
            key="digits/7/img-001.png",
            kind="created",
            etag="0cc175b9c0f1b6a831c399e269772661",
            size=1234,
            version_id="7a3c2b7e-1f7b-4a4e-9d6f-3a1c9e0b5d21",
            sequencer="17B2C5A3F1E0D4A1",
        )
    ]


@pytest.mark.parametrize(
    "event",
    [
        "s3:ObjectCreated:Put",
        "s3:ObjectCreated:Post",
        "s3:ObjectCreated:Copy",
        "s3:ObjectCreated:CompleteMultipartUpload",
        "s3:ObjectCreated:PutRetention",
    ],
)
def test_every_object_created_event_is_created(event: str) -> None:
    record = _put("digits/7/a.png")
    record["eventName"] = event
    [change] = parse_minio_notification(_notification(record))
    assert change.kind == "created"


@pytest.mark.parametrize("event", ["s3:ObjectRemoved:Delete", "s3:ObjectRemoved:DeleteMarkerCreated"])
def test_a_delete_notification_is_removed_without_etag_or_size(event: str) -> None:
    # MinIO's delete records carry the key and sequencer, but no size and no eTag.
    raw = _notification(_record(event, "digits%2F3%2Fold.png", sequencer="17B2C5A3F1E0D4FF"))
    [change] = parse_minio_notification(raw)
    assert change == ObjectChange("incoming", "digits/3/old.png", "removed", sequencer="17B2C5A3F1E0D4FF")
    assert change.etag == "" and change.size is None and change.version_id is None
    assert change.dataset_token == "digits"


def test_keys_are_url_decoded_spaces_plus_and_unicode() -> None:
    # MinIO query-escapes the key: '/' as %2F, ' ' as '+', a literal '+' as %2B, UTF-8 bytes %-encoded.
    raw = _notification(
        _put("cells%2Fmitosis%2Fplate+3_well+A1.tif"),
        _put("cells%2F0%2FZelle+%C3%84+%E6%97%A5%E6%9C%AC.TIFF"),
        _put("cells%2F0%2Fa%2Bb+%F0%9F%94%AC%25.png"),
        _put("cells/0/plain.png"),  # an unescaped key passes as it is
    )
    keys = [change.key for change in parse_minio_notification(raw)]
    assert keys == [
        "cells/mitosis/plate 3_well A1.tif",
        "cells/0/Zelle Ä 日本.TIFF",
        "cells/0/a+b 🔬%.png",
        "cells/0/plain.png",
    ]


def test_invalid_utf8_escapes_become_replacement_characters() -> None:
    # %FF and a lone continuation byte are no UTF-8: the key keeps U+FFFD, and validation rejects it later.
    raw = _notification(_put("digits%2F7%2Fbad%FF%80name.png"))
    [change] = parse_minio_notification(raw)
    assert change.key.startswith("digits/7/bad") and change.key.endswith("name.png")
    assert "\ufffd" in change.key
    assert change.key.encode("utf-8")  # no surrogates: it is a valid str


def test_several_records_keep_their_order_and_fields() -> None:
    raw = _notification(
        _put("digits%2F1%2Fa.png", eTag='"aaaa"', size=10, sequencer="01"),
        _record("s3:ObjectRemoved:Delete", "digits%2F2%2Fb.png", sequencer="02"),
        _put("other%2F1%2Fc.png", bucket="elsewhere", eTag="cccc", size=0, versionId="", sequencer="03"),
    )
    changes = parse_minio_notification(raw)
    assert [(c.bucket, c.key, c.kind) for c in changes] == [
        ("incoming", "digits/1/a.png", "created"),
        ("incoming", "digits/2/b.png", "removed"),
        ("elsewhere", "other/1/c.png", "created"),
    ]
    assert changes[0].etag == "aaaa"  # quotes around the eTag are dropped
    assert changes[2].size == 0 and changes[2].version_id is None  # empty versionId: unversioned bucket
    assert [c.sequencer for c in changes] == ["01", "02", "03"]


def test_a_record_without_sequencer_or_optional_fields_parses() -> None:
    record = _put("digits/7/a.png")
    obj = record["s3"]["object"]
    for field in ("sequencer", "size", "eTag", "versionId"):
        del obj[field]
    [change] = parse_minio_notification(_notification(record))
    assert change == ObjectChange("incoming", "digits/7/a.png", "created")


def test_the_same_notification_parses_to_equal_changes() -> None:
    # MinIO sends duplicates and replays without ids: equal changes are what lets the batcher merge them.
    raw = _notification(_put("digits%2F7%2Fa.png"))
    assert parse_minio_notification(raw) == parse_minio_notification(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "no Records"),
        (b'"Records"', "no Records"),
        (b"{}", "no Records"),
        (b'{"EventName": "s3:ObjectCreated:Put", "Key": "incoming/a"}', "no Records"),
        (b'{"Records": []}', "no Records"),
        (b'{"Records": {"eventName": "s3:ObjectCreated:Put"}}', "no Records"),
    ],
)
def test_what_is_no_notification_is_an_invalid_event(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        parse_minio_notification(raw)


@pytest.mark.parametrize(
    "event", ["s3:ObjectAccessed:Get", "s3:ObjectAccessed:Head", "s3:Replication:OperationFailedReplication"]
)
def test_unsupported_event_names_are_invalid_and_say_which(event: str) -> None:
    record = _put("digits/7/a.png")
    record["eventName"] = event
    with pytest.raises(InvalidEvent, match="unsupported MinIO event") as err:
        parse_minio_notification(_notification(_put("digits/7/ok.png"), record))
    assert event in str(err.value)
    assert "put and delete" in str(err.value)  # what to configure instead


@pytest.mark.parametrize(
    "breaks",
    [
        lambda r: r.pop("eventName"),
        lambda r: r.pop("s3"),
        lambda r: r["s3"].pop("object"),
        lambda r: r["s3"].pop("bucket"),
        lambda r: r["s3"]["bucket"].pop("name"),
        lambda r: r["s3"]["object"].pop("key"),
        lambda r: r.__setitem__("s3", "not an object"),
    ],
)
def test_records_missing_required_fields_are_invalid(breaks: Any) -> None:
    record = copy.deepcopy(_put("digits/7/a.png"))
    breaks(record)
    with pytest.raises(InvalidEvent, match="MinIO record without"):
        parse_minio_notification(_notification(_put("digits/7/ok.png"), record))


def test_a_record_that_is_no_object_is_invalid() -> None:
    raw = json.dumps({"EventName": "s3:ObjectCreated:Put", "Records": ["digits/7/a.png"]}).encode()
    with pytest.raises(InvalidEvent):
        parse_minio_notification(raw)
