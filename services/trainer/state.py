"""The trainer's own state per model, in NATS KV: the last drift-triggered training and whether the model
needs labels (drift came, but no newer labelled data was there to train on)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

__all__ = ["ModelState", "TrainerState"]


@dataclass
class ModelState:
    last_drift_training_at: float = 0.0  # unix time
    needs_labels: bool = False
    needs_labels_since: float = 0.0
    drift_event_id: str | None = None
    trained_dataset_version: int | None = None  # the newest dataset version the drift found


class TrainerState:
    def __init__(self, js: Callable[[], JetStreamContext], bucket: str) -> None:
        self.js, self.bucket = js, bucket
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js().key_value(self.bucket)
        return self._kv

    async def get(self, model: str) -> ModelState:
        try:
            entry = await (await self.kv()).get(model)
        except KeyNotFoundError:
            return ModelState()
        return ModelState(**json.loads(entry.value or b"{}"))

    async def put(self, model: str, state: ModelState) -> None:
        await (await self.kv()).put(model, json.dumps(asdict(state)).encode())
