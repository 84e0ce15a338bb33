"""Serving's repository manager: a promoted version becomes a loaded, smoke-tested Triton model version.

On ``model.promoted`` (staging, canary, champion or shadow):

1. download the version's files from MLflow and check each sha256 against the event (skipped when the
   repository already holds exactly those files);
2. write the version folder, and the model's config listing every version a route needs (the rollout state
   in KV: active, canary, shadow) plus this one, so Triton unloads the rest;
3. load through the repository API, wait until the version is ready, run a smoke inference;
4. answer ``model.deployed``, or ``model.deploy_failed`` with the reason after putting the previous config
   back, so the versions that served keep serving.

On ``model.rolled_back`` the versions the routes now need are loaded again (from disk; a version pruned
from disk is downloaded through the MLflow registry, as below): a
champion rollback answers ``model.deployed`` for the version it went back to. A route set by hand
(``conveyor route``) to a version that is not loaded is loaded by ``reconcile``, which the service runs every
few seconds against the rollout states: from disk, or first downloaded through the MLflow registry (the
version's run, checked against the ``sha256.json`` the trainer logged) when no ``model.promoted`` brought it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contracts.envelope import Event
from contracts.events import ModelDeployed, ModelDeployFailed, ModelPromoted, ModelRolledBack
from services.runtime.artifacts import ArtifactMismatch, download_refs, download_registered
from services.runtime.rollouts import Rollouts, routed_versions
from services.runtime.telemetry import get_logger
from services.serving.repository import ModelRepository
from services.serving.triton import TritonAdmin, TritonError

__all__ = ["DeployFailed", "Deployer"]

DEPLOYED_STAGES = ("staging", "canary", "champion", "shadow")


class DeployFailed(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class Deployer:
    repository: ModelRepository
    triton: TritonAdmin
    rollouts: Rollouts
    tracking_uri: str
    work_dir: Path
    load_timeout_s: float = 120.0
    keep_versions: int = 5

    def __post_init__(self) -> None:
        self.log = get_logger(component="deployer")
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._told: set[tuple[str, frozenset[int]]] = set()
        self._not_downloaded: set[tuple[str, int]] = set()

    async def on_promoted(self, event: ModelPromoted) -> Event | None:
        if event.to_stage not in DEPLOYED_STAGES:
            return None
        model, version = event.model, event.version
        async with self._locks[model]:
            started = time.monotonic()
            previous = self.repository.listed(model)
            try:
                await self._fetch(event)
                needed = routed_versions(await self.rollouts.get(model)) | {version}
                loaded = await self._load(model, needed, version)
                latency = await self._smoke(model, version)
            except DeployFailed as exc:
                self.log.warning(
                    "deploy failed", model=model, version=version, code=exc.code, reason=exc.reason
                )
                serving = await self._restore(model, previous)
                return ModelDeployFailed(
                    model=model,
                    version=version,
                    stage=event.to_stage,
                    transition=event.transition,
                    reason_code=exc.code,
                    reason=exc.reason,
                    serving_versions=serving,
                )
            self.repository.prune(model, loaded, self.keep_versions)
            took = round(time.monotonic() - started, 3)
            self.log.info(
                "deployed", model=model, version=version, stage=event.to_stage, loaded=loaded, seconds=took
            )
            return ModelDeployed(
                model=model,
                version=version,
                stage=event.to_stage,
                transition=event.transition,
                backend=self.repository.options.backend,
                loaded_versions=loaded,
                load_seconds=took,
                smoke_latency_ms=latency,
            )

    async def on_rolled_back(self, event: ModelRolledBack) -> Event | None:
        """Load what the routes need now (the version rolled back to is on disk); unload the rest."""
        model = event.model
        async with self._locks[model]:
            started = time.monotonic()
            needed = routed_versions(await self.rollouts.get(model))
            await self._download_missing(model, needed)
            if not needed & set(self.repository.on_disk(model)):
                self.log.error("rollback to a version not on disk", model=model, needed=sorted(needed))
                return None
            target = event.to_version if event.stage == "champion" else None
            try:
                loaded = await self._load(model, needed, target)
                latency = await self._smoke(model, target) if target else None
            except DeployFailed as exc:
                self.log.error("reload after rollback failed", model=model, reason=exc.reason)
                if target is None:
                    return None
                return ModelDeployFailed(
                    model=model,
                    version=target,
                    stage="champion",
                    transition=event.transition,
                    reason_code=exc.code,
                    reason=exc.reason,
                    serving_versions=await self._ready(model),
                )
            if target is None:
                return None
            return ModelDeployed(
                model=model,
                version=target,
                stage="champion",
                transition=event.transition,
                backend=self.repository.options.backend,
                loaded_versions=loaded,
                load_seconds=round(time.monotonic() - started, 3),
                smoke_latency_ms=latency,
            )

    async def reconcile(self, model: str, routed: set[int]) -> list[int] | None:
        """Load the routed versions the config lacks (a route set by hand): from disk, or downloaded from
        the MLflow registry when no ``model.promoted`` brought them. None when nothing was missing, or none
        of them could be had or loaded (each case is logged once; a failed download is tried again each round,
        a failed load only when the routes change)."""
        async with self._locks[model]:
            listed = self.repository.listed(model)
            missing = routed - set(listed)
            key = (model, frozenset(missing))
            if not missing or key in self._told:
                return None
            await self._download_missing(model, missing)
            available = missing & set(self.repository.on_disk(model))
            if not available:
                return None
            try:
                loaded = await self._load(model, set(listed) | available, None)
            except DeployFailed as exc:
                self._told.add(key)
                self.log.error("could not load the routed versions", model=model, reason=exc.reason)
                await self._restore(model, listed)
                return None
            self.log.info("loaded the versions a route needs", model=model, loaded=loaded)
            return loaded

    async def _download_missing(self, model: str, versions: set[int]) -> None:
        """Download those of ``versions`` not on disk through the MLflow registry; a failure is logged once
        per version (the next call tries again: MLflow may be back)."""
        for version in sorted(versions - set(self.repository.on_disk(model))):
            try:
                await self._fetch_registered(model, version)
            except DeployFailed as exc:
                if (model, version) not in self._not_downloaded:
                    self._not_downloaded.add((model, version))
                    self.log.error(
                        "a routed version could not be downloaded",
                        model=model,
                        version=version,
                        reason=exc.reason,
                    )

    async def _fetch_registered(self, model: str, version: int) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.work_dir, prefix="download-") as tmp:
            try:
                folder, shas = await asyncio.to_thread(
                    download_registered, self.tracking_uri, model, version, Path(tmp)
                )
            except ArtifactMismatch as exc:
                raise DeployFailed("download_failed", str(exc)) from exc
            await asyncio.to_thread(self.repository.install, model, version, folder, shas)
        self.log.info("downloaded a routed version from the registry", model=model, version=version)

    async def _fetch(self, event: ModelPromoted) -> None:
        shas = {name: ref.sha256 for name, ref in event.artifacts.items()}
        if self.repository.has_version(event.model, event.version, shas):
            return
        if "serving_spec.json" not in shas:
            raise DeployFailed(
                "download_failed", "model.promoted lists no serving_spec.json among the artifacts"
            )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.work_dir, prefix="download-") as tmp:
            try:
                files = await asyncio.to_thread(
                    download_refs, event.artifacts, Path(tmp) / "files", self.tracking_uri
                )
            except ArtifactMismatch as exc:
                code = "hash_mismatch" if "sha256" in str(exc) else "download_failed"
                raise DeployFailed(code, str(exc)) from exc
            await asyncio.to_thread(self.repository.install, event.model, event.version, files, shas)

    async def _load(self, model: str, needed: set[int], version: int | None) -> list[int]:
        before = self.repository.listed(model)
        try:
            listed = self.repository.write_config(model, needed)
        except ValueError as exc:
            raise DeployFailed("load_failed", str(exc)) from exc
        if listed == before and set(listed) <= set(await self._ready(model)):
            return listed  # already loaded as the routes need it (a canary promoted from staging)
        try:
            await self.triton.load(model, self.load_timeout_s)
            if version is not None:
                await self.triton.wait_ready(model, version, self.load_timeout_s)
        except TritonError as exc:
            raise DeployFailed("load_failed", str(exc)) from exc
        except TimeoutError as exc:
            raise DeployFailed(
                "timeout", f"Triton did not load {model} within {self.load_timeout_s:.0f} s"
            ) from exc
        return listed

    async def _smoke(self, model: str, version: int) -> float:
        """One random image through Triton; the logits must have one row and one column per label."""
        spec = self.repository.spec(model, version)
        served = self.repository.served(model, version)
        shape = [1, *spec["inputs"][0]["shape"][1:]]
        batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        started = time.perf_counter()
        try:
            outputs = await self.triton.infer(model, version, served[spec["inputs"][0]["name"]], batch)
        except TritonError as exc:
            raise DeployFailed("smoke_failed", f"the smoke inference failed: {exc}") from exc
        latency = round((time.perf_counter() - started) * 1000, 3)
        logits = outputs.get(served.get("logits", "logits"))
        want = (1, len(spec["labels"]))
        if logits is None or tuple(logits.shape) != want or not np.isfinite(logits).all():
            got = None if logits is None else list(logits.shape)
            raise DeployFailed(
                "smoke_failed", f"the smoke inference gave logits {got}, expected {list(want)}, finite"
            )
        return latency

    async def _restore(self, model: str, previous: list[int]) -> list[int]:
        """Put the previous config back and reload it; the versions serving afterwards."""
        previous = [v for v in previous if v in self.repository.on_disk(model)]
        try:
            if previous:
                self.repository.write_config(model, previous)
                await self.triton.load(model, self.load_timeout_s)
            else:
                await self.triton.unload(model)
        except (TritonError, ValueError) as exc:
            self.log.error("could not restore the previous versions", model=model, error=str(exc))
        return await self._ready(model)

    async def _ready(self, model: str) -> list[int]:
        try:
            return await self.triton.ready_versions(model)
        except Exception:
            return []
