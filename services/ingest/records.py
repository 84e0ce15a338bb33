"""Object changes: what both triggers (MinIO notifications, the bucket poller) turn an arrival into.

MinIO's notification JSON (``EventName``, ``Key``, ``Records[].s3.object`` with a URL-encoded ``key``,
``size``, ``eTag``, ``versionId`` and ``sequencer``) is parsed here; see
https://min.io/docs/minio/linux/administration/monitoring/bucket-notifications.html
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote_plus

from contracts.envelope import InvalidEvent

__all__ = ["ObjectChange", "parse_minio_notification"]


@dataclass(frozen=True)
class ObjectChange:
    """An object was created (or overwritten) or removed in a bucket."""

    bucket: str
    key: str  # decoded
    kind: Literal["created", "removed"]
    etag: str = ""
    size: int | None = None
    version_id: str | None = None
    sequencer: str = ""  # MinIO orders the events of one key by it; the poller leaves it empty

    @property
    def dataset_token(self) -> str:
        """The first path segment: the dataset this change belongs to, if the key is well formed."""
        return self.key.split("/", 1)[0]


def parse_minio_notification(raw: bytes) -> list[ObjectChange]:
    """The changes in one MinIO notification; ``InvalidEvent`` (dead-lettered) when it is not one."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise InvalidEvent(f"not JSON: {exc}") from exc
    records = doc.get("Records") if isinstance(doc, dict) else None
    if not isinstance(records, list) or not records:
        raise InvalidEvent("not a MinIO bucket notification: no Records[]")
    return [_change(record) for record in records]


def _change(record: Any) -> ObjectChange:
    try:
        name = str(record["eventName"])
        s3 = record["s3"]
        obj = s3["object"]
        bucket = str(s3["bucket"]["name"])
        key = unquote_plus(str(obj["key"]), errors="replace")  # invalid UTF-8 shows as U+FFFD: rejected later
    except (KeyError, TypeError) as exc:
        raise InvalidEvent(f"MinIO record without {exc}: expected eventName and s3.bucket/object") from exc
    if name.startswith("s3:ObjectCreated:"):
        kind: Literal["created", "removed"] = "created"
    elif name.startswith("s3:ObjectRemoved:"):
        kind = "removed"
    else:
        raise InvalidEvent(f"unsupported MinIO event {name!r}: configure only put and delete events")
    try:
        size = int(obj["size"]) if obj.get("size") is not None else None
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"MinIO record with a size that is no integer: {obj.get('size')!r}") from exc
    return ObjectChange(
        bucket=bucket,
        key=key,
        kind=kind,
        etag=str(obj.get("eTag", "")).strip('"'),
        size=size,
        version_id=obj.get("versionId") or None,
        sequencer=str(obj.get("sequencer", "")),
    )
