"""The trainer against real MLflow, nats-server, S3 and DVC: dataset versions become registered models."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contracts.events import (
    DriftDetected,
    ModelTrained,
    ModelTrainingFailed,
    TrainRequested,
)
from contracts.examples import example_event
from contracts.kv import ModelPolicy
from deploy.local.natsconf import ADMIN_USER
from services.ingest.datarepo import DataRepo
from services.ingest.manifest import assign_split
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.consumer import Delivery
from services.trainer.app import build
from services.trainer.config import TrainerSettings
from tests import images
from tests.flows import commit_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = {"epochs": 6, "early_stopping_patience": 2, "batch_size": 64}


class Seen:
    def __init__(self) -> None:
        self.trained: list[ModelTrained] = []
        self.failed: list[ModelTrainingFailed] = []

    async def wait(self, predicate: Callable[[], bool], timeout: float = 180) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out: trained={self.trained} failed={self.failed}")
            await asyncio.sleep(0.1)


@pytest.fixture
def world(
    nats_server: Any, s3_server: Any, mlflow_server: Any, prefix: str, tmp_path: Path
) -> dict[str, Any]:
    repo = DataRepo(
        tmp_path / "ingest" / "repo",
        (tmp_path / "ingest" / "data.git").as_uri(),
        f"s3://dvc/{prefix}",
        s3_server.endpoint,
        s3_server.access_key,
        s3_server.secret_key,
    )
    repo.ensure()
    common = {
        "subject_prefix": prefix,
        "nats_url": nats_server.url,
        "s3_endpoint": s3_server.endpoint,
        "s3_access_key": s3_server.access_key,
        "s3_secret_key": s3_server.secret_key,
        "mlflow_url": mlflow_server.url,
        "state_dir": tmp_path / "state",
    }
    trainer = TrainerSettings(
        **common, nats_user="trainer", nats_password=nats_server.passwords["trainer"], ack_wait_s=10
    )
    admin = Settings(
        **common, service="tests", nats_user=ADMIN_USER, nats_password=nats_server.passwords[ADMIN_USER]
    )
    return {"repo": repo, "trainer": trainer, "admin": admin, "prefix": prefix, "tmp": tmp_path}


@pytest.fixture
async def bus(world: dict[str, Any]) -> AsyncIterator[tuple[EventBus, Seen]]:
    seen = Seen()

    async def on_trained(event: ModelTrained, _: Delivery) -> None:
        seen.trained.append(event)

    async def on_failed(event: ModelTrainingFailed, _: Delivery) -> None:
        seen.failed.append(event)

    admin = EventBus(world["admin"])
    admin.consume(ModelTrained, on_trained, durable="tests-trained")
    admin.consume(ModelTrainingFailed, on_failed, durable="tests-failed")
    async with admin:
        yield admin, seen


async def apply_policy(admin: EventBus, policy: ModelPolicy) -> None:
    kv = await admin.js.key_value(admin.subjects.kv.policy)
    await kv.put(policy.model, policy.model_dump_json().encode())


def load_model(mlflow_url: str, trained: ModelTrained, dest: Path) -> tuple[Any, dict[str, Any]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    local = Path(client.download_artifacts(trained.run_id, "model", str(dest)))
    import torch

    return torch.jit.load(str(local / "model.pt")), {p.name: p for p in local.iterdir()}


async def test_a_dataset_version_becomes_a_registered_candidate_that_serves_the_same(
    world, bus, mlflow_server
):
    admin, seen = bus
    await apply_policy(admin, ModelPolicy(model="digits", hyperparameters=FAST))
    event = commit_version(world["repo"], images.digits_images(), 1)
    app, _ = build(world["trainer"])
    async with app:
        await admin.publish(event)
        await seen.wait(lambda: bool(seen.trained or seen.failed))
    assert not seen.failed, seen.failed
    [trained] = seen.trained
    assert trained.version == 1 and trained.dataset.version == 1 and trained.dataset.git_rev == event.git_rev
    assert trained.metrics.test_accuracy > 0.85, trained.metrics
    assert set(trained.metrics.per_class) == {str(d) for d in range(10)}
    assert {"model.pt", "serving_spec.json", "reference_profile.json", "model_card.md", "labels.json"} <= set(
        trained.artifacts
    )

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert client.get_model_version_by_alias("digits", "candidate").version == "1"
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["conveyor.dataset.dvc_md5"] == event.dvc_md5
    assert "test_accuracy" in run.data.metrics and "conveyor.code_version" in run.data.tags

    # The registered TorchScript, with the serving spec's preprocessing, gives the reported test accuracy:
    # the same predictions as the in-memory model that was evaluated.
    module, files = load_model(mlflow_server.url, trained, world["tmp"] / "download")
    for name, ref in trained.artifacts.items():
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == ref.sha256
    spec = json.loads(files["serving_spec.json"].read_text())
    profile = json.loads(files["reference_profile.json"].read_text())
    assert spec["inputs"][0]["name"] == "image" and spec["labels"] == [str(d) for d in range(10)]
    assert profile and "# " in files["model_card.md"].read_text()
    import torch

    from services.runtime.preprocessing import PreprocessSpec, preprocess_batch

    pre = PreprocessSpec.from_dict(spec["preprocessing"])
    test = [
        (label, data)
        for label, name, data in images.digits_images()
        if assign_split(hashlib.md5(data).hexdigest()) == "test"
    ]
    x = preprocess_batch([data for _, data in test], pre)
    with torch.no_grad():
        logits, embedding = module(torch.from_numpy(x))
    predicted = [spec["labels"][i] for i in logits.argmax(1).tolist()]
    accuracy = float(np.mean([p == label for p, (label, _) in zip(predicted, test, strict=True)]))
    assert accuracy == pytest.approx(trained.metrics.test_accuracy, abs=1e-9)
    assert embedding.shape[0] == len(test)

    # lineage walks back to the dataset version and the objects in the bucket
    env = os.environ | {
        "CONVEYOR_MLFLOW_URL": mlflow_server.url,
        "CONVEYOR_STATE_DIR": str(world["tmp"] / "cli"),
        "COLUMNS": "200",
    }
    out = subprocess.run(
        [sys.executable, "-m", "deploy.local.cli", "lineage", "digits@1", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lineage = json.loads(out.stdout)
    assert lineage["dataset"] == "digits@1" and lineage["git_rev"] == event.git_rev
    assert lineage["dvc_md5"] == event.dvc_md5 and len(lineage["sources"]) == 1797


async def test_a_dataset_with_one_label_fails_cleanly(world, bus, mlflow_server):
    admin, seen = bus
    event = commit_version(
        world["repo"], [i for i in images.digits_images(200) if i[0] == "3"], 1, dataset="threes"
    )
    app, _ = build(world["trainer"])
    async with app:
        await admin.publish(event)
        await seen.wait(lambda: bool(seen.failed or seen.trained))
    [failed] = seen.failed
    assert failed.reason_code == "too_few_labels" and "at least 2" in failed.reason
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=mlflow_server.url).get_run(failed.run_id or "").info.status == "FAILED"


async def test_a_backlog_is_coalesced_into_the_newest_version(world, bus):
    admin, seen = bus
    await apply_policy(admin, ModelPolicy(model="digits", hyperparameters=FAST))
    digits = images.digits_images()
    events = [commit_version(world["repo"], digits[: 600 + 100 * v], v) for v in (1, 2, 3)]
    app, _ = build(world["trainer"])
    async with app:
        for event in events:
            await admin.publish(event)
        await seen.wait(lambda: any(t.dataset.version == 3 for t in seen.trained) or bool(seen.failed))
        await asyncio.sleep(3)  # nothing more may come
    assert not seen.failed
    trained = [t.dataset.version for t in seen.trained]
    # Which versions ran depends on what had arrived when the first training started ([1, 3], [2, 3] or
    # [3]); what may never happen: three trainings, or an older version trained after a newer one.
    assert trained[-1] == 3 and len(trained) < 3 and trained == sorted(set(trained)), trained


async def test_manual_and_drift_policies(world, bus):
    admin, seen = bus
    digits = images.digits_images()
    await apply_policy(
        admin, ModelPolicy(model="digits", training={"trigger": "manual"}, hyperparameters=FAST)
    )
    app, service = build(world["trainer"])
    async with app:
        await admin.publish(commit_version(world["repo"], digits[:800], 1))
        await asyncio.sleep(3)
        assert seen.trained == []  # manual: new data alone trains nothing
        await admin.publish(TrainRequested(dataset="digits", request_id="r1", requested_by="tests"))
        await seen.wait(lambda: len(seen.trained) == 1)

        policy = ModelPolicy(
            model="digits", training={"trigger": "on_drift", "retrain_cooldown_s": 3600}, hyperparameters=FAST
        )
        await apply_policy(admin, policy)
        drift = example_event(DriftDetected).model_copy(update={"model": "digits", "version": 1})
        await admin.publish(drift)  # no newer data than version 1: labels are needed
        await asyncio.sleep(3)
        assert len(seen.trained) == 1
        state = await service.handlers.state.get("digits")
        assert state.needs_labels

        await admin.publish(commit_version(world["repo"], digits[:1200], 2))
        await seen.wait(lambda: len(seen.trained) == 2)  # the labels the drift asked for: trained at once
        assert seen.trained[1].dataset.version == 2
        assert not (await service.handlers.state.get("digits")).needs_labels

        await admin.publish(commit_version(world["repo"], digits, 3))
        await asyncio.sleep(3)
        assert len(seen.trained) == 2  # on_drift: new data no drift asked for does not train
        await apply_policy(
            admin,
            ModelPolicy(
                model="digits",
                training={"trigger": "on_drift", "retrain_cooldown_s": 0},
                hyperparameters=FAST,
            ),
        )
        await admin.publish(drift.model_copy(update={"window_end": drift.window_end.replace(year=2031)}))
        await seen.wait(lambda: len(seen.trained) == 3)  # a drift with newer data trains on the newest
        assert seen.trained[2].dataset.version == 3

        await apply_policy(admin, policy)  # cooldown 3600 s again
        await admin.publish(drift.model_copy(update={"window_end": drift.window_end.replace(year=2032)}))
        await asyncio.sleep(3)
    assert len(seen.trained) == 3  # within the cooldown
