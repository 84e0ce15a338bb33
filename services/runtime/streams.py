"""Idempotent creation of the streams and KV buckets of one install (DESIGN.md "Streams").

Provisioning is the admin user's: ``conveyor up`` and ``conveyor streams`` (Compose's ``streams`` service)
create what is missing and update what exists to the declared configuration. Services call it at start with
``update=False``: they check that everything is there and leave its configuration alone. Service users may
not create or update streams (``deploy.local.natsconf.JS_API_DENIED``), so on a server whose streams were
never provisioned a service stops with ``NotProvisioned``, which says what to run; on a server without
authorisation it creates what is missing itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, ObjectStoreConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

from contracts.names import StreamSpec, Subjects

__all__ = [
    "KV_HISTORY",
    "NotProvisioned",
    "ensure_stream",
    "ensure_streams",
    "notification_stream",
    "notification_stream_config",
    "stream_config",
]

KV_HISTORY = 16  # rollout and policy changes kept per key; the audit stream keeps all of them


class NotProvisioned(RuntimeError):
    """A stream or bucket is missing and this NATS user could not create it."""


@asynccontextmanager
async def _creating(name: str) -> AsyncIterator[None]:
    # A request NATS refuses to a user gets no answer: nats-py times out (the refusal goes to the error
    # callback as "permissions violation").
    try:
        yield
    except nats.errors.TimeoutError as exc:
        raise NotProvisioned(
            f"{name} does not exist and creating it got no answer: this NATS user may not create streams "
            "(only the admin user does), or NATS is overloaded. Provision the streams as the admin user: "
            "`conveyor up` does it for the embedded stack; elsewhere run `conveyor streams` (in Compose, "
            "the `streams` service does)"
        ) from exc


def notification_stream(subjects: Subjects) -> str:
    """The stream MinIO's bucket notifications land in, for ingest's ``minio`` trigger."""
    return f"{subjects.stream_prefix}_MINIO"


def notification_stream_config(subjects: Subjects, subject: str, *, replicas: int = 1) -> StreamConfig:
    """The stream of MinIO's notifications on ``subject``. It takes the subject's siblings too
    (``<prefix>.minio.*``): a stream of one literal subject counts as a subscriber of it, so a push
    consumer any user may create could deliver into it (JetStream does not check the consumer creator's
    publish rights on its deliver subject); a wildcard stream does not."""
    parent, dot, _ = subject.rpartition(".")
    return StreamConfig(
        name=notification_stream(subjects),
        description="MinIO bucket notifications for ingest",
        subjects=[f"{parent}.*" if dot else subject],
        storage=StorageType.FILE,
        max_age=7 * 24 * 3600,
        num_replicas=replicas,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig, *, update: bool = True) -> None:
    """Create the stream when it is missing; with ``update``, bring an existing one to ``config``."""
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        async with _creating(f"stream {config.name}"):
            await js.add_stream(config)
        return
    if not update:
        return
    try:
        await js.update_stream(config)
    except BadRequestError as exc:
        # e.g. deny_delete cannot be turned off again once the audit stream has it.
        raise RuntimeError(f"stream {config.name} exists with an incompatible configuration: {exc}") from exc


def stream_config(spec: StreamSpec, *, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        storage=StorageType.FILE,
        max_age=spec.max_age_s or None,
        max_bytes=spec.max_bytes,
        deny_delete=spec.deny_delete,
        deny_purge=spec.deny_purge,
        duplicate_window=spec.duplicate_window_s,
        num_replicas=replicas,
    )


async def ensure_streams(
    js: JetStreamContext,
    subjects: Subjects,
    *,
    replicas: int = 1,
    inference_max_bytes: int = 2 * 1024**3,
    inference_max_age_s: float = 7 * 24 * 3600,
    minio_subject: str | None = None,
    update: bool = True,
) -> list[str]:
    """Create every missing stream and KV bucket, and with ``update`` bring the existing streams to their
    declared configuration; returns their names. ``minio_subject``: also the stream of MinIO's notifications
    on that subject (ingest's ``minio`` trigger)."""
    names = []
    configs = [
        stream_config(spec, replicas=replicas)
        for spec in subjects.streams(
            inference_max_age_s=inference_max_age_s, inference_max_bytes=inference_max_bytes
        )
    ]
    if minio_subject:
        configs.append(notification_stream_config(subjects, minio_subject, replicas=replicas))
    for config in configs:
        await ensure_stream(js, config, update=update)
        assert config.name is not None
        names.append(config.name)
    for bucket, description in (
        (subjects.kv.rollout, "rollout state per model; written only by the registry"),
        (subjects.kv.policy, "per-model policy; written by `conveyor policy apply`"),
        (subjects.kv.ingest_objects, "objects ingest has versioned or rejected; written only by ingest"),
        (subjects.kv.trainer, "the trainer's state per model (drift retraining, labels needed)"),
        (subjects.kv.monitor, "the monitor's state per model (latest windows, drift, judged canary steps)"),
    ):
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            async with _creating(f"KV bucket {bucket}"):
                await js.create_key_value(
                    KeyValueConfig(
                        bucket=bucket,
                        description=description,
                        history=KV_HISTORY,
                        storage=StorageType.FILE,
                        replicas=replicas,
                    )
                )
        names.append(bucket)
    created = False
    try:
        await js.object_store(subjects.predictions_store)
    except (BucketNotFoundError, NotFoundError):
        async with _creating(f"object store {subjects.predictions_store}"):
            await js.create_object_store(
                subjects.predictions_store,  # nats-py sets the config's bucket from this argument
                ObjectStoreConfig(
                    description="images of recent predictions, for feedback labels; written only by the "
                    "gateway",
                    ttl=inference_max_age_s,
                    max_bytes=inference_max_bytes,
                    storage=StorageType.FILE,
                    replicas=replicas,
                ),
            )
        created = True
    # The gateway writes images without waiting for acks (services/serving/gateway/kept.py): when full,
    # the store drops its oldest predictions rather than refusing the newest ones. Its limits are the
    # inference stream's. A service that found the store leaves it as it is, and reads nothing more.
    if update or created:
        config = (await js.stream_info(f"OBJ_{subjects.predictions_store}")).config
        wanted = dataclasses.replace(
            config, discard=DiscardPolicy.OLD, max_bytes=inference_max_bytes, max_age=inference_max_age_s
        )
        if wanted != config:
            await js.update_stream(wanted)
    names.append(subjects.predictions_store)
    return names
