"""Each version's reference profile, from MLflow, loaded once per version (the adapter of the monitor).

The trainer logged ``model/reference_profile.json`` on the version's run, with its sha256 in
``model/sha256.json`` beside it; a profile whose hash differs is refused, not used.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from services.monitor.drift import Reference

__all__ = ["MlflowProfiles", "ProfileError", "ProfileSource", "Profiles"]

PROFILE = "model/reference_profile.json"
SHAS = "model/sha256.json"


class ProfileError(RuntimeError):
    """A version's profile cannot be read (no such version, a missing file or a differing hash)."""


class ProfileSource(Protocol):
    def run_of(self, model: str, version: int) -> str: ...

    def profile(self, model: str, version: int, run_id: str) -> dict[str, Any]: ...

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None: ...


class MlflowProfiles:
    """``ProfileSource`` on an MLflow server (blocking calls: use through ``Profiles``)."""

    def __init__(self, tracking_uri: str, cache_dir: Path) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.cache_dir = cache_dir

    def run_of(self, model: str, version: int) -> str:
        try:
            run_id = self.client.get_model_version(model, str(version)).run_id
        except Exception as exc:
            raise ProfileError(f"{model} version {version} is not in the MLflow registry: {exc}") from exc
        if not run_id:
            raise ProfileError(f"{model} version {version} has no run, so no reference profile")
        return str(run_id)

    def profile(self, model: str, version: int, run_id: str) -> dict[str, Any]:
        dest = self.cache_dir / model / str(version)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            path = Path(self.client.download_artifacts(run_id, PROFILE, str(dest)))
            shas = json.loads(Path(self.client.download_artifacts(run_id, SHAS, str(dest))).read_text())
        except Exception as exc:
            raise ProfileError(f"cannot download the reference profile of run {run_id}: {exc}") from exc
        with path.open("rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest()
        if shas.get(path.name) != actual:
            raise ProfileError(
                f"the reference profile of {model}@{version} has sha256 {actual}, but its run lists "
                f"{shas.get(path.name)}: the artifact was changed after training"
            )
        return dict(json.loads(path.read_text()))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)


class Profiles:
    """The parsed references of the versions seen most recently, at most ``max_versions`` of them, and the
    run of each (looked up once: the profile and the window metrics both need it)."""

    def __init__(self, source: ProfileSource, *, max_versions: int) -> None:
        self.source = source
        self.max_versions = max_versions
        self._cache: OrderedDict[tuple[str, int], Reference] = OrderedDict()
        self._runs: OrderedDict[tuple[str, int], str] = OrderedDict()

    async def get(self, model: str, version: int) -> Reference:
        key = (model, version)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        run_id = await self._run(model, version)
        raw = await asyncio.to_thread(self.source.profile, model, version, run_id)
        reference = self._cache[key] = Reference.from_profile(raw)
        while len(self._cache) > self.max_versions:
            self._cache.popitem(last=False)
        return reference

    async def log_metrics(self, model: str, version: int, metrics: dict[str, float], step: int) -> None:
        run_id = await self._run(model, version)
        await asyncio.to_thread(self.source.log_metrics, run_id, metrics, step)

    async def _run(self, model: str, version: int) -> str:
        key = (model, version)
        if key not in self._runs:
            self._runs[key] = await asyncio.to_thread(self.source.run_of, model, version)
            while len(self._runs) > self.max_versions:
                self._runs.popitem(last=False)
        self._runs.move_to_end(key)
        return self._runs[key]
