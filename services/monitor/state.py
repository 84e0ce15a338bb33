"""The monitor's state per model in NATS KV (bucket ``Subjects.kv.monitor``, key = model name).

What must outlive a process and be shared by replicas: each version's latest closed windows and whether it is
drifting, when the model's last ``drift.detected`` went out (the cooldown), and the canary verdicts given.
Writes are compare-and-set on the entry's revision, so two replicas never lose each other's update.
Only the monitor writes it; ``conveyor drift MODEL`` reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Literal

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from pydantic import BaseModel, Field

from contracts.events import DriftTest, GateResult
from contracts.kv import kv_key
from services.runtime.kvstore import LazyBucket

__all__ = ["ModelRecord", "MonitorState", "VerdictRecord", "VersionRecord", "WindowSummary"]

_RETRIES = 20


class WindowSummary(BaseModel):
    start: datetime | None = None
    end: datetime | None = None
    closed_at: datetime
    samples: int
    errors: int = 0
    outcome: Literal["drift", "clear", "too_few", "no_profile"]
    severity: str | None = None
    tests: list[DriftTest] = Field(default_factory=list)
    live_accuracy: float | None = None
    feedback: int = 0
    detail: str | None = None


class VersionRecord(BaseModel):
    windows: list[WindowSummary] = Field(default_factory=list, description="newest last")
    closed: int = Field(0, description="windows closed so far (the step of the MLflow metrics)")
    drifting_since: datetime | None = Field(None, description="end of the window whose drift was reported")


class VerdictRecord(BaseModel):
    version: int
    weight: int
    step_started: datetime
    verdict: Literal["pass", "fail"]
    requests: int
    checks: list[GateResult] = Field(default_factory=list)
    at: datetime
    reason: str | None = None


class ModelRecord(BaseModel):
    model: str
    versions: dict[int, VersionRecord] = Field(default_factory=dict)
    last_drift_at: datetime | None = None
    verdicts: list[VerdictRecord] = Field(default_factory=list, description="newest last")

    def judged(self, version: int, weight: int, started: datetime) -> bool:
        return any((v.version, v.weight, v.step_started) == (version, weight, started) for v in self.verdicts)


class MonitorState(LazyBucket):
    async def get(self, model: str) -> ModelRecord:
        try:
            entry = await (await self.kv()).get(kv_key(model))
        except KeyNotFoundError:
            return ModelRecord(model=model)
        return ModelRecord.model_validate_json(entry.value) if entry.value else ModelRecord(model=model)

    async def records(self) -> list[ModelRecord]:
        """Every model's record."""
        return [ModelRecord.model_validate_json(value) for value in (await self.current()).values() if value]

    async def update(self, model: str, change: Callable[[ModelRecord], None]) -> ModelRecord:
        """Apply ``change`` to the current record and write it only if nobody wrote in between (else read
        again and re-apply)."""
        kv = await self.kv()
        for _ in range(_RETRIES):
            try:
                entry = await kv.get(kv_key(model))
                revision = entry.revision
                record = (
                    ModelRecord.model_validate_json(entry.value) if entry.value else ModelRecord(model=model)
                )
            except KeyNotFoundError:
                record, revision = ModelRecord(model=model), None
            change(record)
            body = record.model_dump_json().encode()
            try:
                if revision is None:
                    await kv.create(kv_key(model), body)
                else:
                    await kv.update(kv_key(model), body, last=revision)
            except KeyWrongLastSequenceError:
                continue
            return record
        raise RuntimeError(f"monitor state of {model} kept changing under {_RETRIES} tries")
