"""MinIO's documented bucket-notification JSON, for tests of the MinIO trigger (no MinIO server can be
installed here, so tests publish what it would publish)."""

from __future__ import annotations

import json
from typing import Any


def record(
    event: str, key: str, *, bucket: str = "incoming", sequencer: str = "17B2C5A3F1E0D4A1", **obj: Any
) -> dict[str, Any]:
    """One record as MinIO writes it (``Records[]`` of its notification JSON, event version 2.0)."""
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": "",
        "eventTime": "2025-03-14T09:26:53.589Z",
        "eventName": event,
        "userIdentity": {"principalId": "minioadmin"},
        "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "10.0.0.7"},
        "responseElements": {
            "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
            "x-amz-request-id": "182C9A7E3F1B2D44",
            "x-minio-deployment-id": "4b1f5c1e-6a0e-4f57-9d2e-0c7e6f1f8f0a",
            "x-minio-origin-endpoint": "http://10.0.0.2:9000",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "minioadmin"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {"key": key, "sequencer": sequencer, **obj},
        },
        "source": {
            "host": "10.0.0.7",
            "port": "",
            "userAgent": "MinIO (linux; amd64) minio-go/v7.0.83 mc/2025",
        },
    }


def put_record(key: str, **obj: Any) -> dict[str, Any]:
    defaults = {
        "size": 1234,
        "eTag": "0cc175b9c0f1b6a831c399e269772661",
        "contentType": "image/png",
        "userMetadata": {"content-type": "image/png"},
        "versionId": "7a3c2b7e-1f7b-4a4e-9d6f-3a1c9e0b5d21",
    }
    return record("s3:ObjectCreated:Put", key, **(defaults | obj))


def notification(*records: dict[str, Any], key: str = "incoming/digits/7/img.png") -> bytes:
    """The notification JSON MinIO publishes on NATS, holding ``records``."""
    return json.dumps({"EventName": records[0]["eventName"], "Key": key, "Records": list(records)}).encode()
