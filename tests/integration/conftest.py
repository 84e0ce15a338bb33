"""Fixtures for messaging tests: a settings factory per simulated service on the session's nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from contracts.events import DatasetRef, DatasetVersioned, ModelTrained
from contracts.kv import Hyperparameters, ModelPolicy
from deploy.local.natsconf import ADMIN_USER
from services.ingest.datarepo import DataRepo
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.datasets import S3Remote
from services.trainer.pipeline import Pipeline, TrainJob
from services.trainer.tracking import MlflowTracker
from tests import images
from tests.flows import commit_version


@pytest.fixture
def service_settings(nats_server: Any, prefix: str) -> Callable[..., Settings]:
    """``service_settings("trainer")``: settings that log in as that service's own NATS user, on this
    test's fresh prefix, with quick retries. ``user="admin"`` logs in as the admin user instead."""

    def make(service: str, *, user: str | None = None, **overrides: Any) -> Settings:
        user = user or service
        values: dict[str, Any] = {
            "service": service,
            "subject_prefix": prefix,
            "nats_url": nats_server.url,
            "nats_user": user,
            "nats_password": nats_server.passwords[user],
            "retry_base_delay_s": 0.05,
            "max_deliveries": 3,
        }
        return Settings(**(values | overrides))

    return make


@pytest.fixture
async def admin_bus(service_settings: Callable[..., Settings]) -> AsyncIterator[EventBus]:
    """A started bus logged in as the admin user (for raw publishes and reading streams)."""
    async with EventBus(service_settings("tests", user=ADMIN_USER)) as bus:
        yield bus


@pytest.fixture(scope="session")
def digits_v1(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> DatasetVersioned:
    """digits@1 (all 1,797 images) in a real DVC repository, made the way ingest makes a version; shared by
    the tests that train on it (the registry's, and the model that serving and the gateway deploy)."""
    tmp = tmp_path_factory.mktemp("digits-data")
    repo = DataRepo(
        tmp / "repo",
        (tmp / "data.git").as_uri(),
        "s3://dvc/digits-tests",
        s3_server.endpoint,
        s3_server.access_key,
        s3_server.secret_key,
    )
    repo.ensure()
    return commit_version(repo, images.digits_images(), 1)


@pytest.fixture(scope="session")
def trained(
    tmp_path_factory: pytest.TempPathFactory, s3_server: Any, mlflow_server: Any, digits_v1: DatasetVersioned
) -> tuple[ModelTrained, Path]:
    """One digits model trained by the trainer's own pipeline (once per session), and its downloaded
    model/ folder: what serving and the gateway tests deploy."""
    tmp = tmp_path_factory.mktemp("serving-model")
    versioned = digits_v1
    tracker = MlflowTracker(mlflow_server.url)
    remote = S3Remote(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    job = TrainJob(
        model="digits-serving",
        dataset=DatasetRef(name="digits", version=1, git_rev=versioned.git_rev, dvc_md5=versioned.dvc_md5),
        repo_url=versioned.repo_url,
        policy=ModelPolicy(
            model="digits-serving", hyperparameters=Hyperparameters(epochs=4, early_stopping_patience=0)
        ),
        cause_id="serving-tests",
    )
    event = Pipeline(tracker, remote, tmp / "cache").run(job)
    local = Path(tracker.client.download_artifacts(event.run_id, "model", str(tmp / "download")))
    return event, local
