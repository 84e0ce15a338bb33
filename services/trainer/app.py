"""Builds the trainer service from settings: one place that wires every dependency (tests pass their own)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from faststream.asgi import AsgiFastStream

from contracts.envelope import Event
from contracts.events import DatasetVersioned, DriftDetected, ModelTrainingFailed, TrainRequested
from services.runtime.bus import EventBus
from services.runtime.datasets import DatasetMismatch, DatasetNotFound, DatasetUnavailable, S3Remote
from services.runtime.errors import TransientError
from services.runtime.policy import Policies
from services.runtime.service import build_app
from services.runtime.telemetry import get_logger
from services.runtime.versions import read_versions
from services.trainer.config import TrainerSettings
from services.trainer.pipeline import Pipeline, TrainingFailed, TrainJob
from services.trainer.scheduler import Scheduler
from services.trainer.state import TrainerState
from services.trainer.subscribers import TrainerHandlers
from services.trainer.tracking import MlflowTracker, Tracker

__all__ = ["TrainerService", "build"]


@dataclass
class TrainerService:
    settings: TrainerSettings
    bus: EventBus
    tracker: Tracker
    pipeline: Pipeline
    scheduler: Scheduler[TrainJob, Event] = field(init=False)
    ready: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.log = get_logger(service=s.service)
        self.scheduler = Scheduler(self.run_job)
        self.handlers = TrainerHandlers(
            self.scheduler,
            Policies(lambda: self.bus.js, s.subjects.kv.policy),
            TrainerState(lambda: self.bus.js, s.subjects.kv.trainer),
            lambda dataset: read_versions(s, dataset),
            self.trained_on,
            keepalive_s=s.ack_wait_s / 3,
        )
        self.bus.consume(
            DatasetVersioned, self.handlers.on_dataset_versioned, max_in_flight=s.trainer_backlog
        )
        self.bus.consume(TrainRequested, self.handlers.on_train_requested, max_in_flight=s.trainer_backlog)
        self.bus.consume(DriftDetected, self.handlers.on_drift_detected, max_in_flight=s.trainer_backlog)

    async def run_job(self, job: TrainJob) -> Event:
        """One training in a worker thread; a failure of the data or the training becomes its event."""
        self.log.info("training", model=job.model, dataset=f"{job.dataset.name}@{job.dataset.version}")
        try:
            event: Event = await asyncio.to_thread(self.pipeline.run, job)
        except TrainingFailed as exc:
            self.log.warning("training failed", model=job.model, reason=exc.reason)
            return _failed(job, exc.code, exc.reason, exc.run_id)
        except (DatasetNotFound, DatasetMismatch) as exc:
            return _failed(job, "data_error", str(exc), None)
        except DatasetUnavailable as exc:  # the store is down: worth a retry of the message
            raise TransientError(str(exc)) from exc
        except Exception as exc:  # a crash: reported once, not retried forever
            self.log.exception("training crashed", model=job.model)
            return _failed(job, "crash", f"{type(exc).__name__}: {exc}", None)
        self.log.info(
            "trained",
            model=job.model,
            version=getattr(event, "version", None),
            run_id=getattr(event, "run_id", None),
        )
        return event

    async def trained_on(self, model: str) -> int | None:
        """The dataset version the model's newest version was trained on (None: never trained)."""
        latest = await asyncio.to_thread(self.tracker.latest_version, model)
        if latest is None or "@" not in latest.tags.get("dataset", ""):
            return None
        return int(latest.tags["dataset"].rsplit("@", 1)[1])

    async def start(self) -> None:
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.scheduler.close()


def _failed(job: TrainJob, code: str, reason: str, run_id: str | None) -> ModelTrainingFailed:
    return ModelTrainingFailed(
        model=job.model,
        dataset=job.dataset.name,
        dataset_version=job.dataset.version,
        run_id=run_id,
        reason_code=code,
        reason=reason,
        cause_id=job.cause_id,
    )


def build(
    settings: TrainerSettings | None = None, *, tracker: Tracker | None = None
) -> tuple[AsgiFastStream, TrainerService]:
    s = settings or TrainerSettings()
    if s.torch_threads:
        import torch

        torch.set_num_threads(s.torch_threads)
    tracker = tracker or MlflowTracker(s.mlflow_url)
    pipeline = Pipeline(tracker, S3Remote.from_settings(s), s.cache_dir, s.trainer_device)
    service = TrainerService(s, EventBus(s), tracker, pipeline)

    async def ready() -> bool:
        return service.ready

    app = build_app(service.bus, ready=ready, start=[service.start], stop=[service.stop])
    return app, service
