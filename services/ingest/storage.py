"""The object store as ingest sees it (any S3 API: MinIO, AWS, the embedded rclone), behind a small Protocol.

The minio client is synchronous; every call runs in a worker thread. rclone's S3 returns XML errors the SDK
cannot parse, so failures are mapped by status code where it matters.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from minio import Minio
from minio.error import S3Error

__all__ = ["Listed", "Missing", "ObjectStore", "S3Store", "TooLarge", "copy_hashing"]

CHUNK = 1024 * 1024


class Missing(Exception):
    """The object is gone (deleted after it was listed or announced)."""


class TooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size:,} bytes, over the limit of {limit:,} (CONVEYOR_INGEST_MAX_BYTES)")
        self.size = size


@dataclass(frozen=True)
class Listed:
    key: str
    etag: str
    size: int


def copy_hashing(chunks: Iterable[bytes], dest: Path, max_bytes: int) -> tuple[str, int]:
    """Write ``chunks`` to ``dest`` and return (md5, size): the one pass that hashes a file during ingest.

    The write of one chunk overlaps the hashing of the next (both release the GIL), so a large file costs
    about the slower of the two rather than their sum (bench/ingest.py measures it against md5sum). A file of
    one chunk (most images) is written without the writer thread, whose start costs more than its write.
    """
    md5, size = hashlib.md5(usedforsecurity=False), 0
    with dest.open("wb") as out, ExitStack() as stack:
        first: bytes | None = None  # held until a second chunk shows the file needs the writer thread
        writer: ThreadPoolExecutor | None = None
        pending: Future[int] | None = None
        for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge(size, max_bytes)
            if writer is None:
                if first is None:
                    first = chunk
                    md5.update(chunk)
                    continue
                writer = stack.enter_context(ThreadPoolExecutor(1))
                pending, first = writer.submit(out.write, first), None
            if pending is not None:
                pending.result()
            pending = writer.submit(out.write, chunk)
            md5.update(chunk)
        if pending is not None:
            pending.result()
        if first is not None:
            out.write(first)
    return md5.hexdigest(), size


class ObjectStore(Protocol):
    async def list(self, bucket: str) -> list[Listed]: ...
    async def download(self, bucket: str, key: str, dest: Path, max_bytes: int) -> tuple[str, int]: ...
    async def quarantine(
        self, bucket: str, key: str, to_bucket: str, to_key: str, reason: Mapping[str, object]
    ) -> str: ...


class S3Store:
    def __init__(self, endpoint: str, access_key: str, secret_key: str, region: str = "us-east-1") -> None:
        secure = endpoint.startswith("https://")
        host = endpoint.removeprefix("https://").removeprefix("http://").rstrip("/")
        self.client = Minio(host, access_key=access_key, secret_key=secret_key, secure=secure, region=region)

    async def list(self, bucket: str) -> list[Listed]:
        """Every object of the bucket (a full listing: the poller diffs it against what it knows)."""

        def run() -> list[Listed]:
            return [
                Listed(o.object_name or "", (o.etag or "").strip('"'), o.size or 0)
                for o in self.client.list_objects(bucket, recursive=True)
                if o.object_name and not o.is_dir
            ]

        return await asyncio.to_thread(run)

    async def download(self, bucket: str, key: str, dest: Path, max_bytes: int) -> tuple[str, int]:
        """Stream ``key`` into ``dest`` and return (md5, size): the file is hashed once, while it arrives."""

        def run() -> tuple[str, int]:
            try:
                response = self.client.get_object(bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject") or getattr(exc.response, "status", 0) == 404:
                    raise Missing(key) from exc
                raise
            try:
                declared = int(response.headers.get("Content-Length", "0") or 0)
                if declared > max_bytes:
                    raise TooLarge(declared, max_bytes)
                return copy_hashing(response.stream(CHUNK), dest, max_bytes)
            finally:
                response.close()
                response.release_conn()

        return await asyncio.to_thread(run)

    async def quarantine(
        self, bucket: str, key: str, to_bucket: str, to_key: str, reason: Mapping[str, object]
    ) -> str:
        """Copy an object to the quarantine bucket with ``<to_key>.reason.json`` beside it; its URI."""

        def run() -> str:
            body = json.dumps(reason, indent=2).encode()
            note = f"{to_key}.reason.json"
            self.client.put_object(
                to_bucket, note, io.BytesIO(body), len(body), content_type="application/json"
            )
            response = self.client.get_object(bucket, key)
            try:
                length = int(response.headers.get("Content-Length", "-1") or -1)
                stream = cast(BinaryIO, response)  # urllib3's response reads like a file
                self.client.put_object(to_bucket, to_key, stream, length, part_size=16 * CHUNK)
            finally:
                response.close()
                response.release_conn()
            return f"s3://{to_bucket}/{to_key}"

        return await asyncio.to_thread(run)
