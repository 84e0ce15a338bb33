"""Measuring a challenger for its gates: download and verify it, smoke-load it, time it, and evaluate it on
the champion's frozen test split (the test split of the dataset version the champion was trained on).

Synchronous (torch, MLflow, DVC): the registry calls ``judge`` from a worker thread.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from contracts.events import ModelTrained, TrainMetrics
from contracts.kv import GatePolicy
from services.registry.evaluation import (
    ArtifactMismatch,
    LoadedModel,
    download_model_dir,
    evaluate_on,
    latency_p50_ms,
    smoke_load,
    split_files,
)
from services.registry.gates import GateReport, SmokeResult, evaluate_gates
from services.registry.store import ModelStore, VersionInfo
from services.runtime.datasets import DatasetNotFound, S3Remote, fetch_version
from services.runtime.telemetry import get_logger

__all__ = ["Gatekeeper"]


@dataclass
class Gatekeeper:
    store: ModelStore
    remote: S3Remote
    cache_dir: Path  # clones of data repositories and their DVC caches

    def __post_init__(self) -> None:
        self.log = get_logger(component="gates")

    def judge(self, event: ModelTrained, policy: GatePolicy, champion: VersionInfo | None) -> GateReport:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir, prefix="challenger-") as tmp:
            try:
                model_dir = download_model_dir(self.store.client, event.run_id, Path(tmp), event.artifacts)
            except ArtifactMismatch as exc:
                loaded, smoke = None, SmokeResult(False, str(exc))
            else:
                loaded, smoke = smoke_load(model_dir)
            latency = latency_p50_ms(loaded) if loaded is not None and smoke.ok else None
            champion_metrics = on_frozen = None
            if champion is not None:
                champion_metrics = self.store.run_metrics(champion)
                if loaded is not None and smoke.ok:
                    on_frozen = self._on_frozen_split(loaded, champion)
            return evaluate_gates(
                event.metrics,
                policy,
                champion=champion_metrics,
                challenger_on_frozen=on_frozen,
                smoke=smoke,
                latency_ms_p50=latency,
            )

    def _on_frozen_split(self, loaded: LoadedModel, champion: VersionInfo) -> TrainMetrics | None:
        """The challenger's metrics on the champion's test split; None when that split cannot be had.

        A store that is down raises (``DatasetUnavailable``, transient): the event is retried.
        """
        tags = self.store.run_tags(champion)
        try:
            name, version = tags["conveyor.dataset.name"], int(tags["conveyor.dataset.version"])
            files = fetch_version(
                tags["conveyor.dataset.repo_url"],
                name,
                version,
                self.remote,
                self.cache_dir,
                git_rev=tags.get("conveyor.dataset.git_rev"),
                dvc_md5=tags.get("conveyor.dataset.dvc_md5"),
            )
        except (KeyError, ValueError, DatasetNotFound) as exc:
            self.log.warning("champion's test split not found", champion=champion.version, error=str(exc))
            return None
        test = split_files(files)
        if not test:
            return None
        return evaluate_on(loaded, test)
