"""Per-model policy, read from NATS KV (written by `conveyor policy apply`); every service reads it."""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError

from contracts.kv import ModelPolicy, kv_key
from services.runtime.kvstore import LazyBucket

__all__ = ["Policies"]


class Policies(LazyBucket):
    async def get(self, model: str) -> ModelPolicy:
        """The model's policy; the defaults when none was applied."""
        try:
            entry = await (await self.kv()).get(kv_key(model))
        except KeyNotFoundError:
            return ModelPolicy(model=model)
        return ModelPolicy.model_validate_json(entry.value or b"{}")

    async def all(self) -> list[ModelPolicy]:
        return [ModelPolicy.model_validate_json(raw) for raw in (await self.current()).values() if raw]

    async def for_dataset(self, dataset: str) -> list[ModelPolicy]:
        """The models that train on ``dataset``: the one of the same name (unless its policy names another
        dataset) and every model whose policy names it."""
        applied = {p.model: p for p in await self.all()}
        models = [p for p in applied.values() if p.dataset_name == dataset]
        if dataset not in applied:
            models.append(ModelPolicy(model=dataset))
        return sorted(models, key=lambda p: p.model)
