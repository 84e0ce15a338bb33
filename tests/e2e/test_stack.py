"""`conveyor up` → status → write data → `down` → `up` keeps the data → `down`; a taken port is named."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from minio import Minio

from deploy.local.config import StackSettings
from deploy.local.parts import port_is_free
from deploy.local.secrets import LocalSecrets
from deploy.local.services import ServiceSpec, service_env
from deploy.local.state import pid_alive, read_json
from services.runtime.config import Settings
from tests.flows import assert_one_mlflow_trace, two_hops
from tests.servers import free_stack_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SERVERS = {"nats", "s3", "mlflow", "triton"}


def conveyor(env: dict[str, str], *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would (a separate process), with the test's state dir and ports."""
    return subprocess.run(
        [sys.executable, "-m", "deploy.local.cli", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _kill_leftovers(state_dir: Path) -> None:
    """Last resort after a failed test: stop whatever the state files still name (same process only)."""
    for path in (state_dir / "run" / "stack.json", state_dir / "run" / "supervisor.pid"):
        data = read_json(path) or {}
        entries = [*data.get("parts", []), data.get("supervisor") or {}, data]
        for entry in entries:
            if pid_alive(entry.get("pid"), entry.get("identity")):
                os.killpg(entry["pid"], signal.SIGKILL)


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a stack in a temp state dir on free ports; always brought down afterwards."""
    env = free_stack_env(tmp_path / "state")
    yield env
    conveyor(env, "down")
    _kill_leftovers(tmp_path / "state")


def _json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def status_json(env: dict[str, str]) -> dict[str, Any]:
    result = conveyor(env, "status", "--json")
    return json.loads(result.stdout)


def up(env: dict[str, str]) -> None:
    start = time.monotonic()
    result = conveyor(env, "up")
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"conveyor up took {time.monotonic() - start:.1f} s")


def stack_ports(env: dict[str, str]) -> list[int]:
    keys = ("NATS_PORT", "NATS_HTTP_PORT", "S3_PORT", "MLFLOW_PORT", "TRITON_HTTP_PORT", "TRITON_GRPC_PORT")
    return [int(env[f"CONVEYOR_{key}"]) for key in keys]


def minio_client(endpoints: dict[str, Any]) -> Minio:
    s3 = endpoints["s3"]
    return Minio(
        s3["endpoint"].removeprefix("http://"),
        access_key=s3["access_key"],
        secret_key=s3["secret_key"],
        secure=False,
        region=s3["region"],
    )


async def publish(endpoints: dict[str, Any], subject: str, payload: bytes) -> int:
    nats_ep = endpoints["nats"]
    nc = await nats.connect(nats_ep["url"], user=nats_ep["user"], password=nats_ep["password"])
    try:
        ack = await nc.jetstream().publish(subject, payload, headers={"Nats-Msg-Id": "e2e-1"})
        return ack.seq
    finally:
        await nc.close()


async def read_back(endpoints: dict[str, Any], stream: str, seq: int) -> bytes:
    nats_ep = endpoints["nats"]
    nc = await nats.connect(nats_ep["url"], user=nats_ep["user"], password=nats_ep["password"])
    try:
        msg = await nc.jetstream().get_msg(stream, seq)
        return msg.data or b""
    finally:
        await nc.close()


def test_up_status_down_up_keeps_the_data(stack_env: dict[str, str]) -> None:
    up(stack_env)  # how long it takes is bench/up.py's figure

    status = status_json(stack_env)
    assert status["healthy"], json.dumps(status, indent=2)
    assert {p["name"] for p in status["parts"]} >= SERVERS
    assert all(p["healthy"] and p["alive"] for p in status["parts"])
    streams = {s["name"]: s for s in status["jetstream"]["streams"]}
    assert {"CONVEYOR_EVENTS", "CONVEYOR_INFERENCE", "CONVEYOR_DLQ", "CONVEYOR_AUDIT"} <= set(streams)
    assert status["jetstream"]["dead_letters"] == 0
    endpoints = status["endpoints"]
    for key in ("nats", "s3", "mlflow", "triton", "gateway"):
        assert endpoints[key]["url" if key != "s3" else "endpoint"].startswith(("nats://", "http://"))
    experiment = endpoints["mlflow"]["experiment_id"]
    assert experiment

    again = conveyor(stack_env, "up")
    assert again.returncode == 1 and "already running" in again.stderr

    data = b"an image, in spirit"
    minio_client(endpoints).put_object("incoming", "digits/7/one.png", io.BytesIO(data), len(data))
    seq = asyncio.run(publish(endpoints, "conveyor.dataset.versioned.digits", b'{"e2e": true}'))

    pids = [p["pid"] for p in status["parts"]]
    down = conveyor(stack_env, "down")
    assert down.returncode == 0, down.stderr
    assert "nats" in down.stdout and "triton" in down.stdout
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert all(port_is_free(port) for port in stack_ports(stack_env))
    stopped = status_json(stack_env)
    assert stopped["running"] is False
    # `conveyor logs` reads the files, whether the stack is up or not: each service started, then stopped
    logs = conveyor(stack_env, "logs", "-n", "400", "--json")
    assert logs.returncode == 0, logs.stderr
    said = [json.loads(line) for line in logs.stdout.splitlines()]
    for service in ("ingest", "trainer", "registry", "serving", "gateway", "monitor"):
        mine = [r["event"] for r in said if r.get("part") == service and r["service"] == "supervisor"]
        assert mine[-2:] == ["started", "stopped"], (service, mine)
    shown = conveyor(stack_env, "logs", "nats", "trainer", "-n", "5")
    assert shown.returncode == 0 and "(supervisor) stopped" in shown.stdout, shown.stdout + shown.stderr
    unknown = conveyor(stack_env, "logs", "nosuch")
    assert unknown.returncode == 2 and "the parts with logs" in unknown.stderr and "triton" in unknown.stderr

    up(stack_env)
    after = status_json(stack_env)
    assert after["healthy"]
    assert after["endpoints"]["s3"]["secret_key"] == endpoints["s3"]["secret_key"]  # same credentials
    assert after["endpoints"]["mlflow"]["experiment_id"] == experiment
    got = minio_client(after["endpoints"]).get_object("incoming", "digits/7/one.png").read()
    assert got == data
    assert asyncio.run(read_back(after["endpoints"], "CONVEYOR_EVENTS", seq)) == b'{"e2e": true}'

    assert conveyor(stack_env, "down").returncode == 0
    assert all(port_is_free(port) for port in stack_ports(stack_env))


def test_taken_port_is_named(stack_env: dict[str, str]) -> None:
    port = int(stack_env["CONVEYOR_NATS_PORT"])
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        result = conveyor(stack_env, "up")
    assert result.returncode != 0
    message = " ".join((result.stdout + result.stderr).split())
    assert f"port {port} (nats) is taken" in message
    assert "CONVEYOR_NATS_PORT" in message
    assert read_json(Path(stack_env["CONVEYOR_STATE_DIR"]) / "run" / "supervisor.pid") is None


def test_services_in_the_stack_trace_into_mlflow(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Services started with the environment the supervisor gives them send one trace to MLflow's store."""
    from mlflow import MlflowClient

    up(stack_env)
    status = status_json(stack_env)
    experiment = status["endpoints"]["mlflow"]["experiment_id"]
    for key, value in stack_env.items():
        monkeypatch.setenv(key, value)
    stack = StackSettings()
    secrets = LocalSecrets.load(stack.state_dir)
    assert secrets is not None

    def settings_for(service: str) -> Settings:
        # exactly what `python -m services.<service>` would read from its environment
        env = service_env(ServiceSpec(service), stack, secrets, threads=1, experiment_id=experiment)
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            return Settings()

    asyncio.run(two_hops(settings_for))
    client = MlflowClient(tracking_uri=status["endpoints"]["mlflow"]["url"])
    asyncio.run(assert_one_mlflow_trace(client, experiment))


def test_the_demo_closes_the_loop(stack_env: dict[str, str]) -> None:
    """`conveyor demo` from nothing: upload → dataset → model → champion → predictions through the gateway →
    drifted traffic → drift.detected → feedback labels → digits@2 → retrained model → canary judged by the
    monitor → new champion. Then `conveyor drift` and the audit log show what happened."""
    started = time.monotonic()
    result = conveyor(stack_env, "demo", timeout=1500)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "10/10 right" in out or "9/10 right" in out, out[-3000:]
    assert "drift.detected on digits@1" in out
    assert "digits@2: 250 new files" in out
    assert "canary.verdict: digits@2 pass" in out
    assert "the loop closed" in out
    print(f"the demo took {time.monotonic() - started:.0f} s")
    drift = conveyor(stack_env, "drift", "digits", "--json")
    assert drift.returncode == 0, drift.stderr
    record = json.loads(drift.stdout)
    first = record["versions"]["1"]["windows"][0]
    assert first["outcome"] == "drift" and any(
        t["name"] == "ks.mean" and t["drifted"] for t in first["tests"]
    )
    assert [(v["version"], v["verdict"]) for v in record["verdicts"]] == [(2, "pass")]
    assert not record["trainer"]["needs_labels"]  # the feedback labels answered the drift
    audit = conveyor(stack_env, "audit", "digits")
    assert audit.returncode == 0 and "canary" in audit.stdout, audit.stdout + audit.stderr
    status = status_json(stack_env)
    assert status["jetstream"]["dead_letters"] == 0
    assert status["jetstream"]["attention"] == []  # digits@1 drifted, but it serves nothing any more
    # every line a service wrote through the whole loop is JSON, its libraries' records (MLflow, httpx) too
    logs = Path(stack_env["CONVEYOR_STATE_DIR"]) / "logs"
    for service in ("ingest", "trainer", "registry", "serving", "gateway", "monitor"):
        lines = (logs / f"{service}.log").read_text().splitlines()
        not_json = [line for line in lines if not _json_object(line)]
        assert lines and not not_json, (service, not_json[:10])
