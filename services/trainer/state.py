"""The trainer's own state per model, in NATS KV: the last drift-triggered training and whether the model
needs labels (drift came, but no newer labelled data was there to train on)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from nats.js.errors import KeyNotFoundError

from services.runtime.kvstore import LazyBucket

__all__ = ["ModelState", "TrainerState"]


@dataclass
class ModelState:
    last_drift_training_at: float = 0.0  # unix time
    needs_labels: bool = False
    needs_labels_since: float = 0.0
    drift_event_id: str | None = None
    trained_dataset_version: int | None = None  # the newest dataset version the drift found


class TrainerState(LazyBucket):
    async def get(self, model: str) -> ModelState:
        try:
            entry = await (await self.kv()).get(model)
        except KeyNotFoundError:
            return ModelState()
        return ModelState(**json.loads(entry.value or b"{}"))

    async def put(self, model: str, state: ModelState) -> None:
        await (await self.kv()).put(model, json.dumps(asdict(state)).encode())
