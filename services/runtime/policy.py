"""Per-model policy, read from NATS KV (written by `conveyor policy apply`); every service reads it."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from contracts.kv import ModelPolicy, kv_key

__all__ = ["Policies"]


class Policies:
    def __init__(self, js: Callable[[], JetStreamContext], bucket: str) -> None:
        self.js = js  # a getter: the connection exists only once the service started
        self.bucket = bucket
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js().key_value(self.bucket)
        return self._kv

    async def get(self, model: str) -> ModelPolicy:
        """The model's policy; the defaults when none was applied."""
        try:
            entry = await (await self.kv()).get(kv_key(model))
        except KeyNotFoundError:
            return ModelPolicy(model=model)
        return ModelPolicy.model_validate_json(entry.value or b"{}")

    async def all(self) -> list[ModelPolicy]:
        kv = await self.kv()
        try:
            keys = await kv.keys()
        except NoKeysError:
            return []
        return [await self.get(key) for key in keys]

    async def for_dataset(self, dataset: str) -> list[ModelPolicy]:
        """The models that train on ``dataset``: the one of the same name (unless its policy names another
        dataset) and every model whose policy names it."""
        applied = {p.model: p for p in await self.all()}
        models = [p for p in applied.values() if p.dataset_name == dataset]
        if dataset not in applied:
            models.append(ModelPolicy(model=dataset))
        return sorted(models, key=lambda p: p.model)
