"""The server fixtures work: each real server is up, reachable with its credentials, set up as documented."""

from __future__ import annotations

import io

import httpx
import nats
import pytest

from contracts.names import Subjects
from deploy.local.builders import BUCKETS
from services.runtime.streams import ensure_streams
from tests.servers import MlflowServer, NatsServer, S3Server, TritonServer

pytestmark = pytest.mark.integration


async def test_nats_jetstream_with_admin_credentials(nats_server: NatsServer, prefix: str) -> None:
    nc = await nats.connect(**nats_server.connect_kwargs())
    try:
        js = nc.jetstream()
        subjects = Subjects(prefix)
        await ensure_streams(js, subjects, inference_max_bytes=16 * 1024**2)
        ack = await js.publish(subjects.event("dataset.versioned", "digits"), b"{}")
        assert ack.stream == subjects.control_stream
        info = await js.stream_info(subjects.control_stream)
        assert info.state.messages == 1
    finally:
        await nc.close()
    async with httpx.AsyncClient() as client:
        health = await client.get(f"{nats_server.monitor_url}/healthz?js-enabled-only=true")
    assert health.status_code == 200


async def test_nats_service_user_keeps_its_rights_on_any_prefix(nats_server: NatsServer, prefix: str) -> None:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    admin = await nats.connect(**nats_server.connect_kwargs())
    await ensure_streams(admin.jetstream(), Subjects(prefix), inference_max_bytes=16 * 1024**2)
    await admin.close()
    nc = await nats.connect(**nats_server.connect_kwargs("ingest"), error_cb=on_error)
    try:
        js = nc.jetstream()
        ack = await js.publish(f"{prefix}.dataset.versioned.digits", b"{}", timeout=2)
        assert ack.seq >= 1
        with pytest.raises(nats.errors.Error):
            await js.publish(f"{prefix}.model.promoted.digits", b"{}", timeout=1)
    finally:
        await nc.close()


def test_s3_buckets_exist_and_objects_round_trip(s3_server: S3Server, prefix: str) -> None:
    client = s3_server.client()
    assert {b.name for b in client.list_buckets()} >= set(BUCKETS)
    for bucket in BUCKETS:
        assert client.bucket_exists(bucket)
    data = b"hello conveyor"
    client.put_object("incoming", f"{prefix}/digits/0/a.png", io.BytesIO(data), len(data))
    assert client.get_object("incoming", f"{prefix}/digits/0/a.png").read() == data


def test_mlflow_health_and_artifacts_on_s3(mlflow_server: MlflowServer, prefix: str) -> None:
    assert httpx.get(f"{mlflow_server.url}/health").status_code == 200
    api = f"{mlflow_server.url}/api/2.0/mlflow"
    experiment = httpx.post(f"{api}/experiments/create", json={"name": prefix}).json()["experiment_id"]
    run = httpx.post(f"{api}/runs/create", json={"experiment_id": experiment}).json()["run"]["info"]
    # Upload one artifact through the server's proxy; it must land in the S3 store's mlflow bucket.
    artifact_uri: str = run["artifact_uri"]
    assert artifact_uri.startswith("mlflow-artifacts:/")
    path = artifact_uri.removeprefix("mlflow-artifacts:/").lstrip("/") + "/hello.txt"
    put = httpx.put(f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts/{path}", content=b"hi")
    assert put.status_code == 200, put.text
    keys = [o.object_name for o in mlflow_server.s3.client().list_objects("mlflow", recursive=True)]
    assert any(key.endswith(f"{run['run_id']}/artifacts/hello.txt") for key in keys), keys


def test_triton_live_in_explicit_mode(triton_server: TritonServer) -> None:
    assert httpx.get(f"{triton_server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{triton_server.url}/v2/health/ready").status_code == 200
    index = httpx.post(f"{triton_server.url}/v2/repository/index", json={})
    assert index.status_code == 200
    # Explicit model control: nothing loads by itself; what is listed, serving tests loaded by name.
    assert all(m["name"].startswith(("m-", "g-")) for m in index.json()), index.json()
    assert httpx.get(triton_server.metrics_url).status_code == 200
