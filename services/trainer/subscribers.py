"""The trainer's subscribers: which event trains which model, by the model's training policy.

- ``dataset.versioned``: every model that trains on the dataset with trigger ``on_new_data``, and an
  ``on_drift`` model whose drift found no newer data (it needs labels: these are them); other triggers only
  record (the event stays in the stream, where a later drift finds it).
- ``train.requested``: the named model (or the dataset's models), whatever their trigger.
- ``drift.detected``: a model with trigger ``on_drift`` trains on the newest dataset version newer than the
  one it was trained on, at most once per cooldown; without newer data it records that labels are needed.
Each handler waits for its training, keeping its JetStream message alive, and returns the event to publish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from contracts.envelope import Event
from contracts.events import DatasetRef, DatasetVersioned, DriftDetected, TrainRequested
from contracts.kv import ModelPolicy
from services.runtime.consumer import Delivery
from services.runtime.errors import PermanentError
from services.runtime.policy import Policies
from services.runtime.telemetry import get_logger
from services.trainer.pipeline import TrainJob
from services.trainer.scheduler import Scheduler
from services.trainer.state import TrainerState

__all__ = ["TrainerHandlers"]

VersionsReader = Callable[[str], Awaitable[list[DatasetVersioned]]]
TrainedOn = Callable[[str], Awaitable[int | None]]  # model -> dataset version of its newest model version


class TrainerHandlers:
    def __init__(
        self,
        scheduler: Scheduler[TrainJob, Event],
        policies: Policies,
        state: TrainerState,
        versions: VersionsReader,
        trained_on: TrainedOn,
        keepalive_s: float,
    ) -> None:
        self.scheduler, self.policies, self.state = scheduler, policies, state
        self.versions, self.trained_on, self.keepalive_s = versions, trained_on, keepalive_s
        self.log = get_logger(component="trainer")

    async def on_dataset_versioned(self, event: DatasetVersioned, delivery: Delivery) -> list[Event]:
        jobs = []
        for policy in await self.policies.for_dataset(event.dataset):
            trigger = policy.training.trigger
            if trigger == "on_drift" and await self._labels_arrived(policy.model, event):
                trigger = "on_new_data"  # a drift asked for these labels: train on them now
            if trigger != "on_new_data":
                self.log.info("new data recorded, not trained", model=policy.model, trigger=trigger)
                continue
            jobs.append(_job(policy, event, _cause(delivery)))
        return await self._train(jobs, delivery)

    async def _labels_arrived(self, model: str, event: DatasetVersioned) -> bool:
        """A drift found no newer data for ``model`` and this version brings it: record the training."""
        state = await self.state.get(model)
        if not state.needs_labels:
            return False
        state.last_drift_training_at, state.needs_labels, state.needs_labels_since = time.time(), False, 0.0
        state.trained_dataset_version = event.version
        await self.state.put(model, state)
        self.log.info("labels arrived after a drift: training", model=model, dataset_version=event.version)
        return True

    async def on_train_requested(self, event: TrainRequested, delivery: Delivery) -> list[Event]:
        versions = await self.versions(event.dataset)
        chosen = [v for v in versions if event.version in (None, v.version)]
        if not chosen:
            which = f"{event.dataset}@{event.version}" if event.version else event.dataset
            raise PermanentError(f"no version of {which}: `conveyor datasets` lists the versions")
        policies = (
            [await self.policies.get(event.model)]
            if event.model
            else await self.policies.for_dataset(event.dataset)
        )
        return await self._train([_job(p, chosen[-1], _cause(delivery)) for p in policies], delivery)

    async def on_drift_detected(self, event: DriftDetected, delivery: Delivery) -> list[Event]:
        policy = await self.policies.get(event.model)
        if policy.training.trigger != "on_drift":
            return []
        state = await self.state.get(event.model)
        now = time.time()
        if now - state.last_drift_training_at < policy.training.retrain_cooldown_s:
            self.log.info("drift within the retrain cooldown", model=event.model)
            return []
        trained = await self.trained_on(event.model) or 0
        newer = [v for v in await self.versions(policy.dataset_name) if v.version > trained]
        if not newer:
            state.needs_labels, state.drift_event_id = True, _cause(delivery)
            state.needs_labels_since = state.needs_labels_since or now
            await self.state.put(event.model, state)
            self.log.warning(
                "drift but no newer labelled data: labels needed", model=event.model, trained_on=trained
            )
            return []
        state.last_drift_training_at, state.needs_labels, state.needs_labels_since = now, False, 0.0
        state.trained_dataset_version = newer[-1].version
        await self.state.put(event.model, state)
        return await self._train([_job(policy, newer[-1], _cause(delivery))], delivery)

    async def _train(self, jobs: list[TrainJob], delivery: Delivery) -> list[Event]:
        """Run (or join) the trainings, sending progress so the message is not redelivered meanwhile."""
        if not jobs:
            return []
        waits = asyncio.gather(*(self.scheduler.submit(j.model, j, j.dataset.version) for j in jobs))
        while True:
            done, _ = await asyncio.wait({waits}, timeout=self.keepalive_s)
            if done:
                break
            await delivery.in_progress()
        return [event for event in waits.result() if event is not None]


def _cause(delivery: Delivery) -> str:
    return delivery.envelope.id if delivery.envelope else f"seq-{delivery.stream_seq}"


def _job(policy: ModelPolicy, version: DatasetVersioned, cause_id: str) -> TrainJob:
    ref = DatasetRef(
        name=version.dataset, version=version.version, git_rev=version.git_rev, dvc_md5=version.dvc_md5
    )
    return TrainJob(
        model=policy.model, dataset=ref, repo_url=version.repo_url, policy=policy, cause_id=cause_id
    )
