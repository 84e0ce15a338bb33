"""The gateway against the real tritonserver and nats-server, with versions deployed by serving itself:
predictions equal the TorchScript, routing follows the rollout state (blue/green, sticky canary, shadow),
a switch under load fails nothing, feedback becomes labelled data, and bad requests get the right codes.

The gateway runs as users run it: ``python -m services.serving.gateway``, uvicorn with two workers, on a
free port; counts come from its ``/metrics``, summed across the workers."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from contracts.events import DatasetVersioned, InferenceLogged, ModelDeployed, ModelPromoted, ModelTrained
from contracts.kv import ModelPolicy, RolloutPlan, RolloutState
from deploy.local.natsconf import ADMIN_USER
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.consumer import Delivery
from services.serving.app import build as build_serving
from services.serving.config import ServingSettings
from tests import images
from tests.servers import free_port, gateway_env, wait_until_ok

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "gateway-test-key"


class World:
    def __init__(self, admin: EventBus, env: dict[str, str], model: str) -> None:
        self.admin, self.env, self.model = admin, env, model
        self.deployed: list[ModelDeployed] = []
        self.logged: list[InferenceLogged] = []
        self.versions: list[DatasetVersioned] = []
        self.revision = 0
        self.http: httpx.AsyncClient = httpx.AsyncClient()

    @asynccontextmanager
    async def gateway(self, log: Path | None = None, **env: str) -> AsyncIterator[httpx.AsyncClient]:
        """A gateway process (two uvicorn workers) on a free port; its client. ``log``: where its stdout and
        stderr go (else this test's)."""
        port = free_port()
        proc_env = self.env | {"CONVEYOR_GATEWAY_PORT": str(port)} | env
        output = {"stdout": log.open("wb"), "stderr": subprocess.STDOUT} if log else {}
        proc = subprocess.Popen([sys.executable, "-m", "services.serving.gateway"], env=proc_env, **output)
        base = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                await wait_until_ok(http, "/healthz", seconds=60, alive=lambda: proc.poll() is None)
                self.http = http
                await self.synced(http)
                yield http
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if log:
                output["stdout"].close()

    async def synced(self, http: httpx.AsyncClient) -> None:
        """Wait until every worker shows the newest rollout state written (a few answers in a row)."""
        in_a_row = 0
        for _ in range(400):
            doc = (await http.get("/v1/models")).json()["models"].get(self.model)
            seen = doc["revision"] if doc else 0
            in_a_row = in_a_row + 1 if seen == self.revision else 0
            if in_a_row >= 8:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the gateway's workers did not follow the rollout state")

    async def route(self, **fields: Any) -> None:
        """Write the rollout state as the registry would, and wait until the gateway follows it."""
        self.revision += 1
        state = RolloutState(model=self.model, revision=self.revision, **fields)
        kv = await self.admin.js.key_value(self.admin.subjects.kv.rollout)
        await kv.put(self.model, state.model_dump_json().encode())
        if not self.http.is_closed and str(self.http.base_url):
            await self.synced(self.http)

    async def deploy(self, trained: ModelTrained, version: int, transition: int) -> None:
        await self.admin.publish(
            ModelPromoted(
                model=self.model,
                version=version,
                to_stage="staging",
                transition=transition,
                reason="test",
                actor="registry",
                artifacts=trained.artifacts,
                rollout_plan=RolloutPlan(),
            )
        )
        for _ in range(1200):
            if any(d.version == version and d.transition == transition for d in self.deployed):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"version {version} not deployed: {self.deployed}")

    async def predict(self, content: bytes, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"X-API-Key": KEY, "Content-Type": "image/png", **({"X-Request-Key": key} if key else {})}
        headers |= kw.pop("headers", {})
        return await self.http.post(
            f"/v1/models/{self.model}/predict", content=content, headers=headers, **kw
        )

    async def metric(self, name: str, **labels: str) -> float:
        """A counter's value from /metrics (every worker's, summed), 0 when absent."""
        text = (await self.http.get("/metrics")).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith((name + "{", name + " ")):
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture
async def world(
    nats_server: Any, mlflow_server: Any, triton_server: Any, s3_server: Any, prefix: str, tmp_path: Path
) -> AsyncIterator[World]:
    common: dict[str, Any] = {
        "subject_prefix": prefix,
        "nats_url": nats_server.url,
        "mlflow_url": mlflow_server.url,
        "triton_url": triton_server.url,
        "state_dir": tmp_path / "state",
    }
    serving = ServingSettings(
        **common,
        nats_user="serving",
        nats_password=nats_server.passwords["serving"],
        serving_gpu="false",
        serving_model_repository=triton_server.model_repository,
    )
    admin = EventBus(
        Settings(
            **common, service="tests", nats_user=ADMIN_USER, nats_password=nats_server.passwords[ADMIN_USER]
        )
    )
    incoming = f"{prefix}-in"
    s3_server.client().make_bucket(incoming)
    env = gateway_env(prefix, tmp_path / "gateway", nats_server, triton_server) | {
        "CONVEYOR_GATEWAY_API_KEYS": json.dumps([KEY]),
        "CONVEYOR_GATEWAY_MAX_BODY_BYTES": str(64 * 1024),
        "CONVEYOR_GATEWAY_SHADOW_QUEUE": "4096",
        "CONVEYOR_S3_ENDPOINT": s3_server.endpoint,
        "CONVEYOR_S3_ACCESS_KEY": s3_server.access_key,
        "CONVEYOR_S3_SECRET_KEY": s3_server.secret_key,
        "CONVEYOR_INCOMING_BUCKET": incoming,
    }
    w = World(admin, env, f"g-{prefix}")

    async def on_deployed(event: ModelDeployed, _: Delivery) -> None:
        w.deployed.append(event)

    async def on_logged(event: InferenceLogged, _: Delivery) -> None:
        w.logged.append(event)

    admin.consume(ModelDeployed, on_deployed, durable="tests-deployed")

    async def on_versioned(event: DatasetVersioned, _: Delivery) -> None:
        w.versions.append(event)

    admin.consume(InferenceLogged, on_logged, durable="tests-logged")
    admin.consume(DatasetVersioned, on_versioned, durable="tests-versioned")
    serving_app, _ = build_serving(serving)
    async with admin, serving_app:
        yield w


def digit_png(index: int = 0) -> tuple[str, bytes]:
    label, _, data = images.digits_images(60)[index]
    return label, data


async def test_predictions_through_the_gateway_equal_the_torchscript(world, trained, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = mlflow.create_experiment(f"gateway-{world.model}")
    tracing = {  # every predict traced, to MLflow's trace store as the stack does
        "CONVEYOR_GATEWAY_TRACE_SAMPLE_RATE": "1.0",
        "CONVEYOR_OTLP_ENDPOINT": f"{mlflow_server.url}/v1/traces",
        "CONVEYOR_OTLP_HEADERS": json.dumps({"x-mlflow-experiment-id": experiment}),
    }
    joining = {  # one Triton request in flight per worker: the rest wait and join
        "CONVEYOR_GATEWAY_TRITON_IN_FLIGHT": "1",
        "CONVEYOR_GATEWAY_MAX_IMAGES": "100",
    }
    async with world.gateway(**tracing, **joining):
        event, local = trained
        await world.route(active_version=1)
        await world.deploy(event, 1, 1)
        items = images.digits_images(12)
        import torch

        from services.runtime.preprocessing import PreprocessSpec, preprocess_batch

        spec = json.loads((local / "serving_spec.json").read_text())
        module = torch.jit.load(str(local / "model.pt"))
        batch = preprocess_batch([d for _, _, d in items], PreprocessSpec.from_dict(spec["preprocessing"]))
        with torch.no_grad():
            expected = torch.softmax(module(torch.from_numpy(batch))[0], dim=1).numpy()

        one = await world.predict(items[0][2])  # raw bytes
        assert one.status_code == 200, one.text
        files = [("files", (f"{i}.png", d, "image/png")) for i, (_, _, d) in enumerate(items)]
        multi = await world.http.post(
            f"/v1/models/{world.model}/predict", files=files, headers={"X-API-Key": KEY}
        )
        as_json = await world.http.post(
            f"/v1/models/{world.model}/predict",
            json={"images": [base64.b64encode(d).decode() for _, _, d in items]},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        for response in (multi, as_json):
            assert response.status_code == 200, response.text
            doc = response.json()
            assert (doc["version"], doc["route"]) == (1, "active")
            served = np.array(
                [[p["probabilities"][label] for label in spec["labels"]] for p in doc["predictions"]]
            )
            np.testing.assert_allclose(served, expected, atol=1e-4)
            assert [p["label"] for p in doc["predictions"]] == [spec["labels"][i] for i in expected.argmax(1)]
            assert len({p["prediction_id"] for p in doc["predictions"]}) == len(items)
        assert one.json()["predictions"][0]["label"] == spec["labels"][int(expected[0].argmax())]
        for _ in range(100):  # sampled at 100 %: every prediction reaches the monitor's stream
            if sum(len(e.samples) for e in world.logged) >= 1 + 2 * len(items):
                break
            await asyncio.sleep(0.05)
        samples = [s for e in world.logged for s in e.samples]
        assert len(samples) == 1 + 2 * len(items)
        assert all(s.version == 1 and s.route == "active" and s.embedding and s.image_stats for s in samples)

        # concurrent requests join into fewer Triton requests, each still answered with its own rows
        sent = "conveyor_gateway_triton_request_images_count"
        before = await world.metric(sent)
        singles = await asyncio.gather(*(world.predict(items[i % len(items)][2]) for i in range(32)))
        for i, r in enumerate(singles):
            assert r.status_code == 200, r.text
            probabilities = r.json()["predictions"][0]["probabilities"]
            alone = [probabilities[label] for label in spec["labels"]]
            np.testing.assert_allclose(alone, expected[i % len(items)], atol=1e-4)
        joined = await world.metric(sent) - before
        assert joined <= 24, f"{joined:.0f} Triton requests for 32 concurrent predict requests: few joined"
        # more images than Triton takes in one request (its max batch size, 64): sent in parts
        many = [("files", (f"{i}.png", items[i % len(items)][2], "image/png")) for i in range(70)]
        r = await world.http.post(f"/v1/models/{world.model}/predict", files=many, headers={"X-API-Key": KEY})
        assert r.status_code == 200, r.text
        labels = [p["label"] for p in r.json()["predictions"]]
        assert labels == [spec["labels"][int(expected[i % len(items)].argmax())] for i in range(70)]

        # `conveyor predict` as a user runs it, against the same gateway
        files = []
        for i, (_, _, data) in enumerate(items[:3]):
            files.append(tmp_path / f"digit-{i}.png")
            files[-1].write_bytes(data)
        env = world.env | {"CONVEYOR_GATEWAY_URL": str(world.http.base_url), "CONVEYOR_GATEWAY_API_KEY": KEY}
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "deploy.local.cli", "predict", world.model, *map(str, files), "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        labels = [p["label"] for p in json.loads(cli.stdout)["predictions"]]
        assert labels == [spec["labels"][i] for i in expected[:3].argmax(1)]
        denied = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "deploy.local.cli", "predict", world.model, str(files[0])],
            env=env | {"CONVEYOR_GATEWAY_API_KEY": "wrong"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert denied.returncode == 1 and "unauthorized" in denied.stderr
    names: set[str] = set()
    for _ in range(60):  # spans leave in batches; the workers flush them when they stop
        traces = await asyncio.to_thread(mlflow.search_traces, locations=[experiment])
        names = {span.name for trace in traces for span in trace.data.spans}
        if f"predict {world.model}" in names:
            break
        await asyncio.sleep(0.5)
    assert f"predict {world.model}" in names, names


async def _our_regions(triton_server: Any) -> set[str]:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        status = await client.get_system_shared_memory_status(as_json=True)
    finally:
        await client.close()
    return {name for name in status.get("regions", {}) if name.startswith("conveyor-gw-")}


async def test_inputs_through_shared_memory_answer_as_bytes_do_and_outlive_triton_forgetting_them(
    world, trained, triton_server
):
    """The gateway registers its regions with the real tritonserver (same host) and sends inputs through
    them; the answers equal those of a gateway sending bytes; when Triton forgets every region (as after a
    restart) no request fails and the regions come back; a stopped gateway leaves none behind."""
    import tritonclient.grpc.aio as grpcclient

    event, _ = trained
    files = [("files", (f"{i}.png", d, "image/png")) for i, (_, _, d) in enumerate(images.digits_images(8))]
    before = await _our_regions(triton_server)
    answers: dict[str, list[Any]] = {}
    for budget in ("0", "64"):
        async with world.gateway(CONVEYOR_GATEWAY_SHARED_MEMORY_MB=budget) as http:
            await world.route(active_version=1)
            if not world.deployed:
                await world.deploy(event, 1, 1)

            async def predict(http: httpx.AsyncClient = http) -> list[Any]:
                path = f"/v1/models/{world.model}/predict"
                r = await http.post(path, files=files, headers={"X-API-Key": KEY})
                assert r.status_code == 200, r.text
                return [p["probabilities"] for p in r.json()["predictions"]]

            answers[budget] = [await predict() for _ in range(6)]  # both workers, most likely
            registered = await _our_regions(triton_server) - before
            if budget == "0":
                assert not registered
                continue
            assert registered, "the gateway registered no shared-memory region with Triton"
            client = grpcclient.InferenceServerClient(triton_server.grpc_url)
            await client.unregister_system_shared_memory()  # every region: what a Triton restart does
            await client.close()
            again = await asyncio.gather(*(predict() for _ in range(8)))
            assert all(a == answers[budget][0] for a in again)
            assert await _our_regions(triton_server) - before, "the regions were not registered anew"
            names = await _our_regions(triton_server) - before
    assert answers["0"] == answers["64"]
    assert not (await _our_regions(triton_server)) & names, "a stopped gateway left regions in Triton"
    assert not [n for n in names if Path("/dev/shm", n).exists()], "a stopped gateway left /dev/shm files"


async def test_shared_memory_regions_are_reused_within_their_budget_and_refused_ones_mean_bytes(
    triton_server, tmp_path, monkeypatch
):
    import tritonclient.grpc.aio as grpcclient

    from services.serving.gateway import shm

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    inputs = shm.SharedInputs(client, 3 * 1024**2, retire_after_s=0.1)
    try:
        a, b = await inputs.take(1000), await inputs.take(1024**2)  # both 1 MiB, the smallest
        assert a and b and (a.size, b.size) == (1024**2, 1024**2)
        assert await inputs.take(2 * 1024**2) is None  # 2 MiB more: over the budget, both in use
        inputs.give(a)
        assert await inputs.take(10) is a  # reused
        inputs.give(a)
        big = await inputs.take(1024**2 + 1)  # 2 MiB: the free 1 MiB region makes room
        assert big and big.size == 2 * 1024**2 and inputs.allocated == 3 * 1024**2
        registered = await _our_regions(triton_server)
        assert {b.name, big.name} <= registered and a.name not in registered
        inputs.retire(b)  # its request failed: freed after retire_after_s, not reused
        await asyncio.sleep(0.5)
        assert b.name not in await _our_regions(triton_server)
        assert not Path("/dev/shm", b.name).exists() and inputs.allocated == 2 * 1024**2
        inputs.give(big)
    finally:
        await inputs.stop()
    assert not {a.name, b.name, big.name} & await _our_regions(triton_server)
    assert inputs.allocated == 0

    # a region Triton cannot open (here: not where shm_open looks): refused, and bytes from then on
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    elsewhere = shm.SharedInputs(client, 8 * 1024**2, retire_after_s=0.1)
    assert await elsewhere.take(1000) is None
    assert not elsewhere.enabled and elsewhere.allocated == 0 and not list(tmp_path.iterdir())
    assert await elsewhere.take(1000) is None

    # no room in /dev/shm (here: no such folder): bytes, without trying again for each request
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path / "missing")
    full = shm.SharedInputs(client, 8 * 1024**2, retire_after_s=0.1)
    assert await full.take(1000) is None
    assert not full.enabled and full.budget == 0

    # a Triton that does not answer (stopped): this request goes as bytes, the next ones try again
    monkeypatch.setattr(shm, "SHM_DIR", Path("/dev/shm"))
    later = shm.SharedInputs(client, 8 * 1024**2, retire_after_s=0.5)
    os.kill(triton_server.pid, signal.SIGSTOP)
    try:
        assert await later.take(1000) is None
    finally:
        os.kill(triton_server.pid, signal.SIGCONT)
    assert later.enabled
    await asyncio.sleep(1.5)  # Triton, going on, may register it: the region is retired all the same
    assert later.allocated == 0 and not any(
        n.startswith(later._owner) for n in await _our_regions(triton_server)
    )
    region = await later.take(1000)
    assert region is not None and region.name in await _our_regions(triton_server)
    later.give(region)
    await later.stop()
    await client.close()


async def test_a_canary_takes_its_share_stickily_and_a_switch_under_load_fails_nothing(world, trained):
    async with world.gateway():
        event, _ = trained
        await world.route(active_version=1)
        await world.deploy(event, 1, 1)
        await world.deploy(event, 2, 2)  # both loaded: staging loads beside the routed version
        await world.route(active_version=1, canary_version=2, canary_weight=30)
        _, png = digit_png()
        gate = asyncio.Semaphore(16)

        async def version_for(key: str) -> int:
            async with gate:
                response = await world.predict(png, key=key)
            assert response.status_code == 200, response.text
            return int(response.json()["version"])

        versions = await asyncio.gather(*(version_for(f"user-{i}") for i in range(2000)))
        share = versions.count(2) / len(versions)
        print(f"canary share at weight 30: {share:.3f}")
        assert 0.25 <= share <= 0.35
        again = await asyncio.gather(*(version_for(f"user-{i}") for i in range(200)))
        assert again == versions[:200]  # the same key always gets the same version

        # Blue/green under continuous load from several clients: not one request fails.
        failures: list[str] = []
        answered: list[int] = []
        stop = asyncio.Event()

        async def client(n: int) -> None:
            while not stop.is_set():
                response = await world.predict(png)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                else:
                    answered.append(response.json()["version"])

        clients = [asyncio.create_task(client(n)) for n in range(6)]
        await asyncio.sleep(0.5)
        await world.route(active_version=2)  # the registry's switch
        await world.admin.publish(  # ... then serving unloads version 1
            ModelPromoted(
                model=world.model,
                version=2,
                to_stage="champion",
                transition=3,
                reason="test",
                actor="registry",
                artifacts=event.artifacts,
                rollout_plan=RolloutPlan(),
            )
        )
        for _ in range(1200):
            if any(d.transition == 3 for d in world.deployed):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)
        assert [d.loaded_versions for d in world.deployed if d.transition == 3] == [[2]]
        assert failures == [] and 1 in answered and answered[-1] == 2
        print(f"{len(answered)} requests during the switch, 0 failed")


async def test_the_shadow_sees_every_request_and_changes_no_answer(world, trained):
    async with world.gateway():
        event, _ = trained
        await world.route(active_version=1)
        await world.deploy(event, 1, 1)
        await world.deploy(event, 2, 2)
        _, png = digit_png(3)
        before = (await world.predict(png)).json()["predictions"][0]
        await world.route(active_version=1, shadow_version=2)
        answers = [(await world.predict(png)).json() for _ in range(40)]
        assert all(a["version"] == 1 and a["route"] == "active" for a in answers)
        assert all(a["predictions"][0]["probabilities"] == before["probabilities"] for a in answers)
        for _ in range(200):
            compared = await world.metric("conveyor_gateway_shadow_compared_total", model=world.model)
            if compared == 40:
                break
            await asyncio.sleep(0.05)
        assert compared == 40
        assert await world.metric("conveyor_gateway_shadow_dropped_total", model=world.model) == 0
        for _ in range(100):
            shadowed = [s for e in world.logged for s in e.samples if s.shadow is not None]
            if len(shadowed) == 40:
                break
            await asyncio.sleep(0.05)
        assert len(shadowed) == 40 and all(s.shadow.version == 2 and s.shadow.agrees for s in shadowed)

    # A full queue drops mirrors (counted), never requests.
    async with world.gateway(CONVEYOR_GATEWAY_SHADOW_QUEUE="1"):
        burst = await asyncio.gather(*(world.predict(png) for _ in range(40)))
        assert all(r.status_code == 200 for r in burst)
        dropped = await world.metric("conveyor_gateway_shadow_dropped_total", model=world.model)
        compared = await world.metric("conveyor_gateway_shadow_compared_total", model=world.model)
        assert dropped > 0 and dropped + compared <= 40


async def test_bad_requests_get_clear_codes(world, trained, triton_server, tmp_path):
    log = tmp_path / "gateway.log"
    async with world.gateway(log):
        event, _ = trained
        _, png = digit_png()
        no_state = await world.predict(png)  # known nowhere yet
        assert no_state.status_code == 404 and no_state.json()["error"] == "unknown_model"
        unknown = await world.http.get(f"/v1/models/{world.model}")
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_model", unknown.text
        await world.route(canary_version=None, active_version=None)
        undeployed = await world.predict(png)
        assert undeployed.status_code == 503 and undeployed.headers["retry-after"]
        assert (await world.http.get(f"/v1/models/{world.model}")).json()["versions"] == []
        await world.route(active_version=1)
        await world.deploy(event, 1, 1)
        await world.route(active_version=1, shadow_version=2)  # a shadow serving never deployed here
        described = await world.http.get(f"/v1/models/{world.model}")
        assert described.status_code == 200, described.text
        one, two = described.json()["versions"]
        spec = json.loads(
            (triton_server.model_repository / world.model / "1" / "serving_spec.json").read_text()
        )
        assert one == {
            "version": 1,
            "routes": ["active"],
            "ready": True,
            "deployed": True,
            "labels": spec["labels"],
            "input": spec["preprocessing"],
        }
        assert two == {"version": 2, "routes": ["shadow"], "ready": False, "deployed": False}
        assert described.json()["rollout"]["shadow_version"] == 2
        mirrored = await world.predict(png)  # answered by version 1; its mirror to version 2 fails, logged
        assert mirrored.status_code == 200 and mirrored.json()["version"] == 1, mirrored.text
        for _ in range(100):
            if await world.metric("conveyor_gateway_shadow_failed_total", model=world.model) == 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the failed mirror was not counted")
        port = world.http.base_url.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # not HTTP: uvicorn warns
        writer.write(b"\x16\x03\x01 not http\r\n\r\n")
        await writer.drain()
        await reader.read()
        writer.close()
        await world.route(active_version=1)
        cases = {
            "no key": (await world.predict(png, headers={"X-API-Key": "wrong"}), 401, "unauthorized"),
            "text": (
                await world.predict(b"hello", headers={"Content-Type": "text/plain"}),
                415,
                "unsupported_media_type",
            ),
            "gif": (await world.predict(b"GIF89a" + b"\0" * 40), 415, "unsupported_image"),
            "corrupt": (await world.predict(png[:60]), 422, "undecodable_image"),
            "too large": (await world.predict(b"\x89PNG" + b"\0" * 70_000), 413, "too_large"),
            "bad base64": (
                await world.http.post(
                    f"/v1/models/{world.model}/predict", json={"image": "%%%"}, headers={"X-API-Key": KEY}
                ),
                422,
                "bad_base64",
            ),
            "bad name": (
                await world.http.post(
                    "/v1/models/Not_A_Model/predict", content=png, headers={"X-API-Key": KEY}
                ),
                404,
                "unknown_model",
            ),
            "too many files": (
                await world.http.post(
                    f"/v1/models/{world.model}/predict",
                    files=[("files", (f"{i}.png", png[:100], "image/png")) for i in range(65)],
                    headers={"X-API-Key": KEY},
                ),
                413,
                "too_many_images",
            ),
            "no such path": (await world.http.get("/v1/model"), 404, "not_found"),
            "wrong method": (
                await world.http.get(f"/v1/models/{world.model}/predict"),
                405,
                "method_not_allowed",
            ),
            "no boundary": (
                await world.predict(png, headers={"Content-Type": "multipart/form-data"}),
                400,
                "bad_multipart",
            ),
        }
        for name, (response, status, error) in cases.items():
            assert response.status_code == status, (name, response.text)
            assert response.json()["error"] == error, (name, response.text)
            assert response.json()["detail"], name
        ok = await world.predict(png)
        assert ok.status_code == 200  # and the gateway still answers
        # Every answer is counted, under the version chosen (none before the body is read); names the
        # gateway does not know make no series of their own.
        count = functools.partial(world.metric, "conveyor_gateway_requests_total")
        assert await count(model=world.model, version="1", route="active", status="422") == 1  # corrupt
        assert await count(model=world.model, version="", status="422") == 1  # bad base64
        assert await count(model=world.model, version="", status="401") == 1
        assert await count(model=world.model, version="1", route="active", status="200") == 2  # +mirrored
        assert await count(model="", status="404") == 2  # before the model was known, and Not_A_Model
        assert "Not_A_Model" not in (await world.http.get("/metrics")).text
        documented = (await world.http.get("/openapi.json")).json()["paths"]
        assert "post" in documented["/v1/models/{model}/predict"]  # served by GatewayApp, documented still

        # A model's own policy sets its sampling: at 0, no prediction of it is logged.
        kv = await world.admin.js.key_value(world.admin.subjects.kv.policy)
        policy = ModelPolicy(model=world.model, sampling={"inference_log_rate": 0.0})
        await kv.put(world.model, policy.model_dump_json().encode())
        for _ in range(200):
            sampling = (await world.http.get("/v1/models")).json()["sampling"].get(world.model)
            if sampling and sampling["inference_log_rate"] == 0.0:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)  # every worker follows; earlier samples are flushed
        before = sum(len(e.samples) for e in world.logged)
        answered = [await world.predict(png) for _ in range(20)]
        assert all(r.status_code == 200 for r in answered)
        await asyncio.sleep(1.5)
        assert sum(len(e.samples) for e in world.logged) == before

        # Triton cannot answer (a routed version it never loaded): 503, and the failure is logged, so the
        # monitor counts it in the version's error rate.
        await kv.put(world.model, ModelPolicy(model=world.model).model_dump_json().encode())
        await asyncio.sleep(1.0)
        folder = triton_server.model_repository / world.model
        (folder / "9").mkdir()
        shutil.copy(folder / "1" / "serving_spec.json", folder / "9" / "serving_spec.json")
        await world.route(active_version=9)
        assert (await world.http.get(f"/v1/models/{world.model}")).json()["versions"][0]["ready"] is False
        failed = await world.predict(png)
        assert failed.status_code == 503 and failed.json()["error"] == "triton_unavailable", failed.text
        assert await count(model=world.model, version="9", route="active", status="503") == 1
        for _ in range(100):
            errors = [x for e in world.logged for x in e.samples if not x.ok]
            if errors:
                break
            await asyncio.sleep(0.05)
        assert errors and errors[0].version == 9 and errors[0].error == "triton_unavailable"
        assert errors[0].label is None and errors[0].latency_ms >= 0

    # What the workers wrote, their records and uvicorn's, is JSON lines naming the service
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # one that is not JSON fails here
    assert lines and all(line["service"] == "gateway" and line["level"] for line in lines), lines
    shadow = [line for line in lines if line["event"] == "shadow request failed"]
    assert shadow and shadow[0]["level"] == "warning" and shadow[0]["model"] == world.model, lines
    assert any(line.get("logger") == "uvicorn.error" and "Invalid HTTP" in line["event"] for line in lines)


async def test_a_stalled_client_or_a_stuck_triton_gets_an_answer_in_time(world, trained, triton_server):
    """Every request has a timeout (CONVEYOR_GATEWAY_REQUEST_TIMEOUT_S), reading its body included: a
    client that stops sending mid-body gets a 504, on predict and on feedback alike. A Triton that stops
    answering (SIGSTOP) gets predict a 503 or 504 with Retry-After, and /readyz a 503, not a hang."""
    await world.route(active_version=1)
    async with world.gateway(CONVEYOR_GATEWAY_REQUEST_TIMEOUT_S="1") as http:
        for path, kind in (("predict", "image/png"), ("feedback", "application/json")):
            reader, writer = await asyncio.open_connection("127.0.0.1", http.base_url.port)
            head = (
                f"POST /v1/models/{world.model}/{path} HTTP/1.1\r\nHost: gateway\r\nX-API-Key: {KEY}\r\n"
                f"Content-Type: {kind}\r\nContent-Length: 1000\r\n\r\n"
            )
            writer.write(head.encode() + b"{")  # 1 byte of the 1,000 announced, then nothing
            await writer.drain()
            async with asyncio.timeout(30):  # without a timeout of its own the gateway never answers
                status = await reader.readline()
                headers = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
                length = int(re.search(r"content-length: (\d+)", headers).group(1))
                body = json.loads(await reader.readexactly(length))
            writer.close()
            assert status.split()[1] == b"504", (path, status, body)
            assert body["error"] == "timeout" and "1.0 s" in body["detail"], body
        assert await world.metric("conveyor_gateway_requests_total", model=world.model, status="504") == 1
        big = await http.post(
            f"/v1/models/{world.model}/feedback",
            json={"prediction_id": "x" * 70_000, "label": "3"},
            headers={"X-API-Key": KEY},
        )
        assert big.status_code == 413 and big.json()["error"] == "too_large", big.text

        await world.deploy(trained[0], 1, 1)
        _, png = digit_png()
        assert (await world.predict(png)).status_code == 200
        os.kill(triton_server.pid, signal.SIGSTOP)
        try:
            stuck = await world.predict(png)
            ready = await http.get("/readyz")
        finally:
            os.kill(triton_server.pid, signal.SIGCONT)
        # the request's own timeout, or gRPC's deadline a moment later (Triton unavailable)
        assert stuck.status_code in (503, 504) and stuck.headers["retry-after"], stuck.text
        assert ready.status_code == 503, ready.text
        # counted under its version, and logged as a failure of it (the monitor's canary error rate)
        status = str(stuck.status_code)
        counted = await world.metric("conveyor_gateway_requests_total", version="1", status=status)
        assert counted == 1
        for _ in range(100):
            failed = [x for e in world.logged for x in e.samples if not x.ok]
            if failed:
                break
            await asyncio.sleep(0.05)
        assert [(x.version, x.error) for x in failed] == [(1, stuck.json()["error"])]
        assert (await world.predict(png)).status_code == 200  # Triton back: answers again


async def test_feedback_becomes_labelled_data_that_ingest_versions(
    world, trained, s3_server, nats_server, tmp_path
):
    from services.ingest.app import build as build_ingest
    from services.ingest.config import IngestSettings

    event, _ = trained
    await world.route(active_version=1)
    await world.deploy(event, 1, 1)
    label, png = digit_png(5)
    async with world.gateway():
        answer = (await world.predict(png)).json()["predictions"][0]
        headers = {"X-API-Key": KEY}
        url = f"/v1/models/{world.model}/feedback"
        for _ in range(50):  # the image is kept in the background, right after the answer
            given = await world.http.post(
                url, json={"prediction_id": answer["prediction_id"], "label": label}, headers=headers
            )
            if given.status_code != 404:
                break
            await asyncio.sleep(0.1)
        assert given.status_code == 202, given.text
        unknown = await world.http.post(
            url, json={"prediction_id": "f" * 32, "label": label}, headers=headers
        )
        bad = await world.http.post(
            url, json={"prediction_id": answer["prediction_id"], "label": "Three"}, headers=headers
        )
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_prediction"
    assert bad.status_code == 422 and bad.json()["error"] == "bad_label"
    stored = given.json()["stored"]
    bucket, key = stored.removeprefix("s3://").split("/", 1)
    assert key == f"{world.model}/{label}/feedback-{answer['prediction_id']}.png"
    assert s3_server.client().get_object(bucket, key).read() == png  # the very bytes that were predicted
    for _ in range(100):
        feedback = [f for e in world.logged for f in e.feedback]
        if feedback:
            break
        await asyncio.sleep(0.05)
    [fb] = feedback
    assert (fb.true_label, fb.predicted_label, fb.version) == (label, answer["label"], 1)

    # ... and ingest makes a dataset version of it, like any upload.
    ingest = IngestSettings(
        subject_prefix=world.env["CONVEYOR_SUBJECT_PREFIX"],
        nats_url=nats_server.url,
        nats_user="ingest",
        nats_password=nats_server.passwords["ingest"],
        s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        incoming_bucket=bucket,
        quarantine_bucket=bucket,
        state_dir=tmp_path / "ingest",
        ingest_quiet_window_s=0.3,
        ingest_poll_interval_s=0.2,
    )
    app, _ = build_ingest(ingest)
    async with app:
        for _ in range(600):
            if world.versions:
                break
            await asyncio.sleep(0.05)
    [version] = world.versions
    assert (version.dataset, version.label_counts) == (world.model, {label: 1})
