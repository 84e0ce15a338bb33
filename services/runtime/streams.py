"""Idempotent creation of the streams and KV buckets of one install (DESIGN.md "Streams").

Safe to call from every service at start-up and from ``conveyor up``: an existing stream is updated to the
declared configuration, a missing one is created.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, ObjectStoreConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

from contracts.names import StreamSpec, Subjects

__all__ = ["KV_HISTORY", "ensure_streams", "stream_config"]

KV_HISTORY = 16  # rollout and policy changes kept per key; the audit stream keeps all of them


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
) -> list[str]:
    """Create or update every stream and KV bucket; returns their names."""
    names = []
    for spec in subjects.streams(
        inference_max_age_s=inference_max_age_s, inference_max_bytes=inference_max_bytes
    ):
        config = stream_config(spec, replicas=replicas)
        try:
            await js.stream_info(spec.name)
        except NotFoundError:
            await js.add_stream(config)
        else:
            try:
                await js.update_stream(config)
            except BadRequestError as exc:
                # e.g. deny_delete cannot be turned off again once the audit stream has it.
                raise RuntimeError(
                    f"stream {spec.name} exists with an incompatible configuration: {exc}"
                ) from exc
        names.append(spec.name)
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
    try:
        await js.object_store(subjects.predictions_store)
    except (BucketNotFoundError, NotFoundError):
        await js.create_object_store(
            subjects.predictions_store,  # nats-py sets the config's bucket from this argument
            ObjectStoreConfig(
                description="images of recent predictions, for feedback labels; written only by the gateway",
                ttl=inference_max_age_s,
                max_bytes=inference_max_bytes,
                storage=StorageType.FILE,
                replicas=replicas,
            ),
        )
    # The gateway writes images without waiting for acks (services/serving/gateway/kept.py): when full,
    # the store drops its oldest predictions rather than refusing the newest ones.
    stream = f"OBJ_{subjects.predictions_store}"
    config = (await js.stream_info(stream)).config
    if config.discard != DiscardPolicy.OLD:
        config.discard = DiscardPolicy.OLD
        await js.update_stream(config)
    names.append(subjects.predictions_store)
    return names
