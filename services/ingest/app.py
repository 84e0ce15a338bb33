"""Builds the ingest service from settings: one place that wires every dependency (tests pass their own)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from faststream.asgi import AsgiFastStream

from contracts.names import MINIO_DURABLE
from services.ingest.batcher import Batcher
from services.ingest.config import IngestSettings
from services.ingest.datarepo import DataRepo
from services.ingest.known import KnownObjects
from services.ingest.poller import Poller
from services.ingest.records import parse_minio_notification
from services.ingest.storage import ObjectStore, S3Store
from services.ingest.subscribers import NotificationHandler
from services.ingest.validation import Limits
from services.ingest.versioning import DataRepository, Ingestor
from services.runtime.bus import EventBus
from services.runtime.service import build_app
from services.runtime.streams import ensure_stream, notification_stream, notification_stream_config
from services.runtime.tasks import cancel
from services.runtime.telemetry import get_logger

__all__ = ["IngestService", "build"]


@dataclass
class IngestService:
    """The running parts of ingest: the trigger feeds the batcher; the batch loop versions closed batches."""

    settings: IngestSettings
    bus: EventBus
    repo: DataRepository
    store: ObjectStore
    batcher: Batcher = field(init=False)
    ingestor: Ingestor = field(init=False)
    poller: Poller | None = field(init=False, default=None)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    ready: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.log = get_logger(service=s.service)
        self.known = KnownObjects(lambda: self.bus.js, s.subjects.kv.ingest_objects)
        self.batcher = Batcher(s.ingest_quiet_window_s, s.ingest_max_batch)
        self.ingestor = Ingestor(
            self.repo,
            self.store,
            self.known,
            self.bus.publish,
            incoming_bucket=s.incoming_bucket,
            quarantine_bucket=s.quarantine_bucket,
            limits=Limits(max_bytes=s.ingest_max_bytes, max_pixels=s.ingest_max_pixels),
            split=s.ingest_split,
            work_dir=s.work_dir,
        )
        if s.ingest_trigger == "minio":
            handler = NotificationHandler(self.batcher, self.known, s.incoming_bucket, s.ack_wait_s / 3)
            self.bus.consume_raw(
                notification_stream(s.subjects),
                s.ingest_notify_subject,
                lambda raw: (None, parse_minio_notification(raw)),
                handler,
                durable=MINIO_DURABLE,
                type_label="minio.notification",
                max_in_flight=s.ingest_max_batch + 64,
            )
        else:
            self.poller = Poller(
                self.store, self.known, self.batcher, s.incoming_bucket, s.ingest_poll_interval_s
            )

    async def prepare(self) -> None:
        """The notification stream, the data repository; then finish what a crash interrupted."""
        if self.settings.ingest_trigger == "minio":
            await self._ensure_notification_stream()
        await asyncio.to_thread(self.repo.ensure)  # type: ignore[attr-defined]
        for event in await self.ingestor.recover():
            self.log.warning("announced a version a crash had left unannounced", version=event.version)

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self.run_batches()))
        if self.poller is not None:
            self._tasks.append(asyncio.create_task(self.poller.run()))
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            await cancel(task)

    async def run_batches(self) -> None:
        while True:
            for batch in self.batcher.due():
                try:
                    await self.ingestor.process(batch)
                    batch.resolve()
                except Exception as exc:  # nothing was remembered: the trigger brings the objects again
                    self.log.exception("versioning failed; will retry", dataset=batch.dataset)
                    batch.resolve(exc)
                finally:
                    self.batcher.done(batch)
            await asyncio.sleep(0.1)

    async def _ensure_notification_stream(self) -> None:
        s = self.settings
        config = notification_stream_config(s.subjects, s.ingest_notify_subject)
        await ensure_stream(self.bus.js, config, update=False)


def build(
    settings: IngestSettings | None = None,
    *,
    repo: DataRepository | None = None,
    store: ObjectStore | None = None,
) -> tuple[AsgiFastStream, IngestService]:
    """The ASGI app (health, readiness, metrics) and the service it runs."""
    s = settings or IngestSettings()
    secret = s.s3_secret_key.get_secret_value()
    repo = repo or DataRepo(
        s.repo_dir, s.ingest_git_remote, s.dvc_remote, s.s3_endpoint, s.s3_access_key, secret, s.s3_region
    )
    store = store or S3Store(s.s3_endpoint, s.s3_access_key, secret, s.s3_region)
    service = IngestService(s, EventBus(s), repo, store)

    async def ready() -> bool:
        return service.ready

    app = build_app(
        service.bus, ready=ready, prepare=[service.prepare], start=[service.start], stop=[service.stop]
    )
    return app, service
