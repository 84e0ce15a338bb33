"""Serving's repository manager against the real tritonserver, MLflow and nats-server: a promoted version is
downloaded, verified, written into the model repository, loaded, smoke-tested and announced; a bad one is
refused while the version that served keeps serving."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from contracts.events import (
    ArtifactRef,
    ModelDeployed,
    ModelDeployFailed,
    ModelPromoted,
    ModelRolledBack,
)
from contracts.kv import RolloutPlan, RolloutState
from deploy.local.natsconf import ADMIN_USER
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.serving.app import build
from services.serving.config import ServingSettings
from services.trainer.tracking import MlflowTracker
from tests import images
from tests.flows import Seen

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
async def world(
    nats_server: Any, mlflow_server: Any, triton_server: Any, prefix: str, tmp_path: Path
) -> AsyncIterator[tuple[ServingSettings, EventBus, Seen]]:
    common: dict[str, Any] = {
        "subject_prefix": prefix,
        "nats_url": nats_server.url,
        "mlflow_url": mlflow_server.url,
        "triton_url": triton_server.url,
        "state_dir": tmp_path / "state",
        "retry_base_delay_s": 0.1,
    }
    settings = ServingSettings(
        **common,
        nats_user="serving",
        nats_password=nats_server.passwords["serving"],
        serving_model_repository=triton_server.model_repository,
        serving_gpu="false",
        serving_reconcile_interval_s=0.5,
    )
    admin = Settings(
        **common, service="tests", nats_user=ADMIN_USER, nats_password=nats_server.passwords[ADMIN_USER]
    )
    seen = Seen()

    bus = EventBus(admin)
    bus.consume(ModelDeployed, seen.collect, durable="tests-deployed")
    bus.consume(ModelDeployFailed, seen.collect, durable="tests-deploy-failed")
    async with bus:
        yield settings, bus, seen


TRANSITIONS = iter(range(1, 1_000_000))  # the audit sequence the registry would give each transition


def promoted(
    model: str, version: int, artifacts: dict[str, ArtifactRef], to: str = "champion"
) -> ModelPromoted:
    return ModelPromoted(
        model=model,
        version=version,
        from_stage="candidate",
        to_stage=to,
        transition=next(TRANSITIONS),
        reason="test",
        actor="registry",
        artifacts=artifacts,
        rollout_plan=RolloutPlan(),
    )


async def route(bus: EventBus, state: RolloutState) -> None:
    kv = await bus.js.key_value(bus.subjects.kv.rollout)
    await kv.put(state.model, state.model_dump_json().encode())


def infer(triton_url: str, model: str, version: int, batch: np.ndarray) -> np.ndarray:
    """The logits Triton answers for ``batch``: float32 images as ``image``, uint8 samples as ``pixels``."""
    name, datatype = ("pixels", "UINT8") if batch.dtype == np.uint8 else ("image", "FP32")
    body = {
        "inputs": [
            {"name": name, "shape": list(batch.shape), "datatype": datatype, "data": batch.ravel().tolist()}
        ]
    }
    r = httpx.post(f"{triton_url}/v2/models/{model}/versions/{version}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}["logits"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


async def test_a_promoted_version_serves_what_the_torchscript_computes(world, trained, triton_server, prefix):
    settings, bus, seen = world
    event, local = trained
    model = f"m-{prefix}"
    app, _ = build(settings)
    async with app:
        await route(bus, RolloutState(model=model, active_version=1))
        await bus.publish(promoted(model, 1, event.artifacts))
        await seen.wait(lambda: bool(seen.events))
    [deployed] = seen.events
    assert isinstance(deployed, ModelDeployed), deployed
    assert (deployed.version, deployed.stage, deployed.loaded_versions) == (1, "champion", [1])
    assert deployed.backend == "python" and deployed.smoke_latency_ms is not None
    folder = triton_server.model_repository / model / "1"
    for name, ref in event.artifacts.items():  # what was written is what the trainer published
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == ref.sha256
    assert "version_policy: { specific: { versions: [1] } }" in (folder.parent / "config.pbtxt").read_text()
    served = json.loads((folder / "served.json").read_text())  # the Python backend: the names as they are
    assert served == {name: name for name in ("image", "logits", "embedding", "pixels")}

    import torch

    from services.runtime.preprocessing import PreprocessSpec, preprocess_batch

    spec = json.loads((local / "serving_spec.json").read_text())
    batch = preprocess_batch(
        [data for _, _, data in images.digits_images(40)], PreprocessSpec.from_dict(spec["preprocessing"])
    )
    module = torch.jit.load(str(local / "model.pt"))
    with torch.no_grad():
        expected = module(torch.from_numpy(batch))[0].numpy()
    served = await asyncio.to_thread(infer, triton_server.url, model, 1, batch)
    np.testing.assert_allclose(served, expected, atol=1e-4)  # the same TorchScript on the same CPU
    assert (served.argmax(1) == expected.argmax(1)).all()

    # the same images as their uint8 samples, normalised by model.py: the same input bits, the same logits
    from services.runtime.preprocessing import decode_samples

    pixels = np.stack([decode_samples(data).transpose(2, 0, 1) for _, _, data in images.digits_images(40)])
    assert pixels.dtype == np.uint8 and pixels.shape == batch.shape
    from_pixels = await asyncio.to_thread(infer, triton_server.url, model, 1, pixels)
    assert from_pixels.tobytes() == served.tobytes()
    # one image per request, the two kinds at once: the dynamic batcher may put both in one batch
    singles = [batch[i : i + 1] if i % 2 else pixels[i : i + 1] for i in range(len(batch))]
    answers = await asyncio.gather(
        *(asyncio.to_thread(infer, triton_server.url, model, 1, x) for x in singles)
    )
    np.testing.assert_allclose(np.concatenate(answers), expected, atol=1e-4)
    nothing = {"inputs": []}  # both inputs are optional, yet Triton refuses a request with neither
    url = f"{triton_server.url}/v2/models/{model}/versions/1/infer"
    refused = await asyncio.to_thread(httpx.post, url, json=nothing, timeout=30)
    assert refused.status_code == 400, refused.text


async def test_a_version_that_fails_is_refused_and_the_old_one_keeps_serving(
    world, trained, triton_server, mlflow_server, prefix, tmp_path
):
    settings, bus, seen = world
    event, local = trained
    model = f"m-{prefix}"
    # Version 2: files whose hashes match what is announced, but whose model.pt is not a TorchScript.
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in local.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.pt").write_bytes(b"not a torchscript archive")
    tracker = MlflowTracker(mlflow_server.url)
    run_id = tracker.start(model, "broken", {}, {})
    base = tracker.log_artifacts(run_id, broken)
    tracker.finish(run_id)
    bad = {
        p.name: ArtifactRef(uri=f"{base}/{p.name}", sha256=hashlib.sha256(p.read_bytes()).hexdigest())
        for p in broken.iterdir()
        if p.name != "sha256.json"
    }
    tampered = dict(event.artifacts)
    tampered["model.pt"] = ArtifactRef(uri=event.artifacts["model.pt"].uri, sha256="0" * 64)
    app, _ = build(settings)
    async with app:
        await route(bus, RolloutState(model=model, active_version=1))
        await bus.publish(promoted(model, 1, event.artifacts))
        await seen.wait(lambda: len(seen.events) == 1)
        await route(bus, RolloutState(model=model, active_version=1, canary_version=2, canary_weight=10))
        await bus.publish(promoted(model, 2, bad, to="canary"))
        await seen.wait(lambda: len(seen.events) == 2)
        await bus.publish(promoted(model, 3, tampered, to="staging"))
        await seen.wait(lambda: len(seen.events) == 3)
        ready = await asyncio.to_thread(
            httpx.get, f"{triton_server.url}/v2/models/{model}/versions/1/ready", timeout=10
        )
    [failed, tampered_failed] = seen.of(ModelDeployFailed)
    assert (failed.version, failed.stage, failed.serving_versions) == (2, "canary", [1])
    assert failed.reason_code == "load_failed", failed.reason
    assert (tampered_failed.version, tampered_failed.reason_code) == (3, "hash_mismatch")
    assert "model.pt: sha256" in tampered_failed.reason
    assert not (triton_server.model_repository / model / "3").exists()  # nothing unverified is written
    assert ready.status_code == 200  # version 1 served throughout
    assert "versions: [1]" in (triton_server.model_repository / model / "config.pbtxt").read_text()


async def test_new_versions_load_beside_the_routed_ones_and_a_rollback_reloads_from_disk(
    world, trained, triton_server, prefix
):
    settings, bus, seen = world
    event, _ = trained
    model = f"m-{prefix}"
    app, _ = build(settings)
    async with app:
        await route(bus, RolloutState(model=model, active_version=1))
        await bus.publish(promoted(model, 1, event.artifacts))
        await seen.wait(lambda: len(seen.events) == 1)
        await bus.publish(promoted(model, 2, event.artifacts, to="staging"))
        await seen.wait(lambda: len(seen.events) == 2)
        await route(bus, RolloutState(model=model, active_version=2))  # the registry made 2 champion
        await bus.publish(promoted(model, 2, event.artifacts))
        await seen.wait(lambda: len(seen.events) == 3)
        await route(bus, RolloutState(model=model, active_version=1))  # ... and rolled back
        await bus.publish(
            ModelRolledBack(
                model=model,
                stage="champion",
                from_version=2,
                to_version=1,
                transition=next(TRANSITIONS),
                reason="t",
                actor="x",
            )
        )
        await seen.wait(lambda: len(seen.events) == 4)
        # A route set by hand to a version on disk but unloaded: serving loads it within a few rounds.
        await route(bus, RolloutState(model=model, active_version=1, shadow_version=2))
        for _ in range(200):
            ready = await asyncio.to_thread(
                httpx.get, f"{triton_server.url}/v2/models/{model}/versions/2/ready", timeout=10
            )
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert ready.status_code == 200
    loaded = [(e.version, e.stage, e.loaded_versions) for e in seen.of(ModelDeployed)]
    assert loaded == [
        (1, "champion", [1]),
        (2, "staging", [1, 2]),
        (2, "champion", [2]),
        (1, "champion", [1]),
    ]


async def test_a_route_set_by_hand_to_a_version_never_promoted_is_downloaded_from_the_registry(
    world, trained, triton_server, mlflow_server, prefix
):
    """No model.promoted announced it: serving finds the version's run through the MLflow registry, checks
    its files against the run's sha256.json and loads it; a routed version the registry lacks stays out and
    the rest keeps serving."""
    from mlflow import MlflowClient

    settings, bus, _ = world
    event, _ = trained
    model = f"m-{prefix}"
    client = MlflowClient(mlflow_server.url)
    await asyncio.to_thread(client.create_registered_model, model)
    registered = await asyncio.to_thread(
        client.create_model_version, model, f"runs:/{event.run_id}/model", event.run_id
    )
    assert registered.version == "1"

    async def ready(version: int) -> bool:
        url = f"{triton_server.url}/v2/models/{model}/versions/{version}/ready"
        return (await asyncio.to_thread(httpx.get, url, timeout=10)).status_code == 200

    app, _ = build(settings)
    async with app:
        await route(bus, RolloutState(model=model, active_version=1))
        for _ in range(300):
            if await ready(1):
                break
            await asyncio.sleep(0.1)
        assert await ready(1)
        await route(bus, RolloutState(model=model, active_version=1, canary_version=2, canary_weight=10))
        await asyncio.sleep(2.5)  # several reconcile rounds (0.5 s each)
        assert await ready(1) and not await ready(2)
    folder = triton_server.model_repository / model / "1"
    for name, ref in event.artifacts.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == ref.sha256
    assert not (triton_server.model_repository / model / "2").exists()
