"""What the gateway knows of each model: its rollout state (the registry writes it) and its policy (for the
sampling rates), both followed live from NATS KV, and the serving spec of each version (from the model
repository serving wrote).

Every worker keeps its own copy and swaps a model's state in one assignment, so a blue/green switch is
atomic for each request: a request reads the state once and is answered by the version it chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from contracts.kv import ModelPolicy, RolloutState, SamplingPolicy
from services.runtime.kvstore import LazyBucket
from services.runtime.preprocessing import PreprocessSpec
from services.runtime.tasks import cancel
from services.runtime.telemetry import get_logger
from services.serving.repository import served_names

__all__ = ["Catalog", "Followed", "ServedSpec"]

V = TypeVar("V")

_MAX_BATCH = re.compile(rb"^max_batch_size:\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class ServedSpec:
    preprocessing: PreprocessSpec
    labels: tuple[str, ...]
    input: str  # the names Triton serves the tensors under (served.json)
    logits: str = "logits"
    embedding: str = "embedding"
    pixels: str | None = None  # the uint8 input, where the version takes one (the Python backend's model.py)


class Followed(LazyBucket, Generic[V]):
    """Every key's value of one KV bucket, loaded in full at start, then kept current by a watcher."""

    def __init__(self, js: Callable[[], JetStreamContext], bucket: str, parse: Callable[[bytes], V]) -> None:
        super().__init__(js, bucket)
        self.parse = parse
        self.values: dict[str, V] = {}
        self._task: asyncio.Task[None] | None = None
        self.log = get_logger(component="catalog", bucket=bucket)

    async def start(self) -> None:
        for key, raw in (await self.current()).items():
            self._apply(key, raw)
        watcher = await (await self.kv()).watchall(include_history=False)
        self._task = asyncio.create_task(self._follow(watcher))

    async def stop(self) -> None:
        await cancel(self._task)

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                self._apply(entry.key, None if deleted else entry.value)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _apply(self, key: str, raw: bytes | None) -> None:
        if not raw:
            self.values.pop(key, None)
            return
        try:
            value = self.parse(raw)
        except ValueError as exc:
            self.log.error("unreadable value ignored", key=key, error=str(exc))
            return
        current = self.values.get(key)
        revision = getattr(value, "revision", None)
        if current is None or revision is None or revision >= getattr(current, "revision", 0):
            self.values[key] = value  # one assignment: requests see the old or the new value, whole


class Catalog:
    """``await start()`` loads every model's rollout state and policy, then follows the changes."""

    def __init__(
        self, js: Callable[[], JetStreamContext], rollout_bucket: str, policy_bucket: str, repository: Path
    ) -> None:
        self.repository = repository
        self.rollouts = Followed(js, rollout_bucket, RolloutState.model_validate_json)
        self.policies = Followed(js, policy_bucket, ModelPolicy.model_validate_json)
        self.states = self.rollouts.values
        self._specs: dict[tuple[str, int], ServedSpec] = {}
        self._max_batch: dict[str, tuple[int, int]] = {}  # model -> (config's mtime, its max batch size)

    async def start(self) -> None:
        await self.rollouts.start()
        await self.policies.start()

    async def stop(self) -> None:
        await self.rollouts.stop()
        await self.policies.stop()

    def state(self, model: str) -> RolloutState | None:
        return self.states.get(model)

    def sampling(self, model: str) -> SamplingPolicy | None:
        """The model's sampling rates when a policy was applied for it (else the gateway's settings rule)."""
        policy = self.policies.values.get(model)
        return policy.sampling if policy is not None else None

    def known(self, model: str) -> bool:
        return model in self.states or (self.repository / model).is_dir()

    def spec(self, model: str, version: int) -> ServedSpec:
        """The serving spec of a deployed version; ``FileNotFoundError`` when serving has not written it."""
        cached = self._specs.get((model, version))
        if cached is None:
            folder = self.repository / model / str(version)
            doc = json.loads((folder / "serving_spec.json").read_text())
            served = served_names(folder)
            cached = ServedSpec(
                PreprocessSpec.from_dict(doc["preprocessing"]),
                tuple(doc["labels"]),
                served[doc["inputs"][0]["name"]],
                served.get("logits", "logits"),
                served.get("embedding", "embedding"),
                served.get("pixels"),
            )
            self._specs[(model, version)] = cached
        return cached

    def max_batch(self, model: str) -> int:
        """The most images Triton takes in one request of ``model``: ``max_batch_size`` in its config, as
        serving last wrote it (one config covers every version); 0 when there is none to read."""
        config = self.repository / model / "config.pbtxt"
        try:
            stamp = config.stat().st_mtime_ns
            cached = self._max_batch.get(model)
            if cached is None or cached[0] != stamp:
                found = _MAX_BATCH.search(config.read_bytes())
                cached = self._max_batch[model] = (stamp, int(found.group(1)) if found else 0)
        except OSError:
            return 0
        return cached[1]
