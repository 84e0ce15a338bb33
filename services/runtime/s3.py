"""A minio client for the S3 store a service's settings name (the CLI's uploads, the gateway's feedback)."""

from __future__ import annotations

from minio import Minio

from services.runtime.config import Settings

__all__ = ["s3_client"]


def s3_client(settings: Settings) -> Minio:
    endpoint = settings.s3_endpoint
    return Minio(
        endpoint.removeprefix("https://").removeprefix("http://").rstrip("/"),
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=endpoint.startswith("https://"),
        region=settings.s3_region,
    )
