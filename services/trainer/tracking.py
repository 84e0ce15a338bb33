"""The trainer's MLflow adapter: runs, per-epoch metrics, artifacts, and registered model versions.

The trainer is the only writer of MLflow runs and model versions (DESIGN.md "Ownership"); at registration it
gives the new version the alias ``candidate``, which the registry moves on from. MLflow's client is
synchronous: call these from a worker thread. Artifacts go through the MLflow server's artifact proxy, so
the trainer needs no credentials of the store behind it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

__all__ = ["MlflowTracker", "RegisteredVersion", "Tracker", "fail_fast"]

CANDIDATE = "candidate"
MODEL_DIR = "model"  # artifact path of everything serving needs, in the run


@dataclass(frozen=True)
class RegisteredVersion:
    model: str
    version: int
    run_id: str
    tags: dict[str, str]


class Tracker(Protocol):
    def start(self, model: str, run_name: str, params: dict[str, object], tags: dict[str, str]) -> str: ...
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifacts(self, run_id: str, local_dir: Path) -> str: ...
    def finish(self, run_id: str, *, failed_reason: str | None = None) -> None: ...
    def register(self, model: str, run_id: str, tags: dict[str, str]) -> int: ...
    def latest_version(self, model: str) -> RegisteredVersion | None: ...
    def get_version(self, model: str, version: int) -> RegisteredVersion | None: ...


class MlflowTracker:
    def __init__(self, tracking_uri: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def _experiment(self, model: str) -> str:
        name = f"conveyor/{model}"
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name, tags={"conveyor.model": model}))
        except MlflowException:  # created meanwhile by another replica
            found = self.client.get_experiment_by_name(name)
            assert found is not None
            return str(found.experiment_id)

    def start(self, model: str, run_name: str, params: dict[str, object], tags: dict[str, str]) -> str:
        run = self.client.create_run(self._experiment(model), run_name=run_name, tags=tags)
        run_id = str(run.info.run_id)
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)

    def log_artifacts(self, run_id: str, local_dir: Path) -> str:
        """Upload ``local_dir`` as the run's ``model/`` folder; its URI."""
        self.client.log_artifacts(run_id, str(local_dir), artifact_path=MODEL_DIR)
        return f"{self.client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"

    def finish(self, run_id: str, *, failed_reason: str | None = None) -> None:
        if failed_reason is not None:
            self.client.set_tag(run_id, "conveyor.failure", failed_reason[:5000])
        self.client.set_terminated(run_id, status="FAILED" if failed_reason else "FINISHED")

    def register(self, model: str, run_id: str, tags: dict[str, str]) -> int:
        """A new model version from the run's ``model/`` folder, with the alias ``candidate``."""
        try:
            self.client.create_registered_model(model, tags={"conveyor.owner": "trainer"})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"
        mv = self.client.create_model_version(model, source=source, run_id=run_id, tags=tags)
        self.client.set_registered_model_alias(model, CANDIDATE, str(mv.version))
        return int(mv.version)

    def latest_version(self, model: str) -> RegisteredVersion | None:
        try:
            versions = self.client.search_model_versions(f"name='{model}'", order_by=["version_number DESC"])
        except MlflowException as exc:
            if not _missing(exc):
                raise
            return None
        return _entity(versions[0]) if versions else None

    def get_version(self, model: str, version: int) -> RegisteredVersion | None:
        try:
            return _entity(self.client.get_model_version(model, str(version)))
        except MlflowException as exc:
            if not _missing(exc):
                raise
            return None


def _missing(exc: MlflowException) -> bool:
    """MLflow does not have that model or version; any other error (MLflow down) is no answer and is
    raised, so a trainer asked which data the model was trained on retries rather than reads "never"."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


@contextmanager
def fail_fast(timeout_s: int = 10) -> Iterator[None]:
    """MLflow's client for a command: one retry and ``timeout_s`` per request instead of its defaults (7
    retries with exponential backoff, 120 s), which keep a command waiting minutes for a server that is
    down. The environment is restored after."""
    values = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _entity(mv: object) -> RegisteredVersion:
    return RegisteredVersion(
        model=str(mv.name),  # type: ignore[attr-defined]
        version=int(mv.version),  # type: ignore[attr-defined]
        run_id=str(mv.run_id),  # type: ignore[attr-defined]
        tags=dict(mv.tags or {}),  # type: ignore[attr-defined]
    )
