"""The production configuration of deploy/compose against real servers (no Docker engine runs here).

- nats-server runs ``deploy/compose/nats.conf`` as committed, its passwords from the environment as in the
  container; the real ingest service, configured from compose.yml's ingest environment (only hosts, buckets
  and folders changed for this machine), versions an upload announced by MinIO's notification JSON that the
  ``minio`` user publishes through JetStream, as MinIO does; the users hold exactly their rights; the
  monitor and the gateway, run with compose's command and environment, pass compose's own health checks.
- MLflow runs with compose.yml's command and environment on PostgreSQL (the pre-started server here; the
  test is skipped, saying so, where none is reachable), and the trainer's and the registry's MLflow adapters
  work against it as they do on sqlite.
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from contracts.events import DatasetVersioned
from contracts.kv import RolloutPolicy
from contracts.names import SERVICES, Subjects, inbox_prefix
from deploy.compose import envfile
from deploy.compose.natsconf import NOTIFIER_USER, password_variable
from deploy.local.natsconf import ADMIN_USER
from deploy.local.parts import HealthCheck, Part, find_binary, free_port
from services.ingest.app import build
from services.ingest.config import IngestSettings
from services.registry.stages import plan_transition
from services.registry.store import ModelStore
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.consumer import Delivery
from services.runtime.streams import ensure_streams
from services.trainer.tracking import MlflowTracker
from tests import compose, images
from tests.integration.test_ingest import minio_notification
from tests.servers import S3Server, run_part

pytestmark = pytest.mark.integration

USERS = (ADMIN_USER, *SERVICES, NOTIFIER_USER)
PREFIX = compose.load()["services"]["ingest"]["environment"]["CONVEYOR_SUBJECT_PREFIX"]
POSTGRES_URL = os.environ.get("CONVEYOR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


class ProductionNats:
    def __init__(self, url: str, passwords: dict[str, str]) -> None:
        self.url, self.passwords = url, passwords

    async def connect(self, user: str, **kwargs: Any) -> nats.NATS:
        if user in SERVICES:  # a service user may subscribe to its own inbox only
            kwargs.setdefault("inbox_prefix", inbox_prefix(user))
        return await nats.connect(self.url, user=user, password=self.passwords[user], **kwargs)


@pytest.fixture(scope="module")
def production_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionNats]:
    """nats-server on the committed deploy/compose/nats.conf; only its ports and folder set on the command
    line (the container's come from the file); nats-server reads the passwords from its environment as in
    the container, in the form production settings demand (a letter first: it parses `0-...` as a date)."""
    root = tmp_path_factory.mktemp("production-nats")
    port, http_port = free_port(), free_port()
    passwords = {user: f"p{secrets.token_hex(12)}" for user in USERS}
    part = Part(
        name="nats",
        argv=[
            find_binary("nats-server") or "nats-server",
            *("-c", str(compose.COMPOSE_DIR / "nats.conf")),
            *("-a", "127.0.0.1", "-p", str(port), "-m", str(http_port), "-sd", str(root / "jetstream")),
        ],
        env={password_variable(user): password for user, password in passwords.items()},
        health=HealthCheck(url=f"http://127.0.0.1:{http_port}/healthz?js-enabled-only=true"),
        cwd=root,
        ports={"nats_port": port, "nats_http_port": http_port},
        ready_timeout_s=20,
    )
    with run_part(part, root / "nats.log"):
        yield ProductionNats(f"nats://127.0.0.1:{port}", passwords)


def compose_variables(nats_passwords: dict[str, str], s3: S3Server) -> dict[str, str]:
    """A .env as ``deploy.compose.envfile`` writes it, with this machine's NATS passwords and S3 keys."""
    lines = envfile.render().splitlines()
    variables = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    variables |= {password_variable(user): password for user, password in nats_passwords.items()}
    return variables | {"MINIO_ROOT_USER": s3.access_key, "MINIO_ROOT_PASSWORD": s3.secret_key}


@pytest.fixture
def provisioned(production_nats: ProductionNats, s3_server: S3Server, tmp_path: Path) -> str:
    """Compose's ``streams`` job, its command in its environment, run on this nats-server: the streams exist
    before any service starts, as ``depends_on`` orders it. Returns its output."""
    job = compose.load()["services"]["streams"]
    env = compose.environment("streams", compose_variables(production_nats.passwords, s3_server))
    env |= {"CONVEYOR_NATS_URL": production_nats.url, "CONVEYOR_STATE_DIR": str(tmp_path / "streams")}
    env |= {"CONVEYOR_INFERENCE_MAX_BYTES": str(16 * 1024**2)}  # as every test: a small disk
    assert job["command"][0] == "conveyor"
    command = [sys.executable, "-m", "deploy.local.cli", *job["command"][1:]]
    plain = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    out = subprocess.run(command, env=plain | env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture
async def versions(
    production_nats: ProductionNats, provisioned: str
) -> AsyncIterator[list[DatasetVersioned]]:
    """Every dataset.versioned of the install, read as the admin user."""
    seen: list[DatasetVersioned] = []

    async def on_versioned(event: DatasetVersioned, _: Delivery) -> None:
        seen.append(event)

    settings = Settings(
        service="tests",
        subject_prefix=PREFIX,
        nats_url=production_nats.url,
        nats_user=ADMIN_USER,
        nats_password=production_nats.passwords[ADMIN_USER],
    )
    bus = EventBus(settings)
    bus.consume(DatasetVersioned, on_versioned, durable="tests-production-versioned")
    async with bus:
        yield seen


async def test_ingest_as_compose_runs_it_versions_what_minio_announces(
    production_nats, provisioned, versions, s3_server, tmp_path, monkeypatch
):
    assert f"ready: {Subjects(PREFIX).stream_prefix}_MINIO" in provisioned  # MinIO's notifications land there
    tag = "p" + secrets.token_hex(3)
    client = s3_server.client()
    for bucket in (f"{tag}-in", f"{tag}-q", f"{tag}-dvc"):
        client.make_bucket(bucket)
    git_remote = tmp_path / "data.git"
    git_remote.mkdir()  # a fresh, empty volume is mounted there
    env = compose.environment("ingest", compose_variables(production_nats.passwords, s3_server))
    env |= {
        "CONVEYOR_STATE_DIR": str(tmp_path / "state"),
        "CONVEYOR_NATS_URL": production_nats.url,
        "CONVEYOR_S3_ENDPOINT": s3_server.endpoint,
        "CONVEYOR_INGEST_GIT_REMOTE": git_remote.as_uri(),
        "CONVEYOR_INCOMING_BUCKET": f"{tag}-in",
        "CONVEYOR_QUARANTINE_BUCKET": f"{tag}-q",
        "CONVEYOR_DVC_BUCKET": f"{tag}-dvc",
        "CONVEYOR_INGEST_QUIET_WINDOW_S": "0.5",
    }
    del env["CONVEYOR_OTLP_ENDPOINT"]  # no collector here
    for key in [k for k in os.environ if k.startswith("CONVEYOR_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("CONVEYOR_"):  # the MLFLOW_* and AWS_* ones point at hosts of compose's network
            monkeypatch.setenv(key, value)
    settings = IngestSettings()
    assert (settings.mode, settings.ingest_trigger, settings.nats_user) == ("production", "minio", "ingest")

    app, _ = build(settings)
    async with app:
        notes = []
        for i, (label, name, data) in enumerate(images.digits_images()[:12]):
            key = f"digits/{label}/{name}"
            client.put_object(settings.incoming_bucket, key, io.BytesIO(data), len(data))
            etag = client.stat_object(settings.incoming_bucket, key).etag
            notes.append(minio_notification(settings.incoming_bucket, key, etag, len(data), f"{i + 1:016X}"))
        minio = await production_nats.connect(NOTIFIER_USER)
        try:
            js = minio.jetstream()
            for note in notes:
                await js.publish(settings.ingest_notify_subject, note, timeout=5)
        finally:
            await minio.close()
        for _ in range(600):
            if versions:
                break
            await asyncio.sleep(0.1)
    assert [(v.dataset, v.version, sum(v.label_counts.values())) for v in versions] == [("digits", 1, 12)]
    assert versions[0].repo_url == git_remote.as_uri()
    assert (git_remote / "HEAD").is_file(), "the empty folder became the bare data repository"


async def test_each_user_holds_exactly_its_rights(production_nats):
    subjects = Subjects(PREFIX)
    admin = await production_nats.connect(ADMIN_USER)
    await ensure_streams(admin.jetstream(), subjects, inference_max_bytes=16 * 1024**2)
    before = (await admin.jetstream().stream_info(subjects.control_stream)).state.messages
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc).lower())

    minio = await production_nats.connect(NOTIFIER_USER, error_cb=on_error)
    trainer = await production_nats.connect("trainer", error_cb=on_error)
    try:
        await minio.publish(subjects.event("dataset.versioned", "digits"), b"{}")  # ingest's event
        await trainer.publish(subjects.event("model.promoted", "digits"), b"{}")  # the registry's
        with pytest.raises(nats.errors.Error):  # the deny list: only an operator destroys data
            await trainer.jetstream(timeout=1).delete_stream(subjects.control_stream)
        ack = await trainer.jetstream().publish(subjects.event("model.trained", "digits"), b"{}", timeout=5)
        assert ack.stream == subjects.control_stream
        await asyncio.sleep(0.3)
    finally:
        await minio.close()
        await trainer.close()
    texts = " | ".join(e for e in refused if "permissions violation" in e)
    for subject in ("dataset.versioned.digits", "model.promoted.digits", "$js.api.stream.delete."):
        assert subject in texts, texts
    info = await admin.jetstream().stream_info(subjects.control_stream)
    assert info.state.messages == before + 1  # only the trainer's own event got in
    await admin.close()
    with pytest.raises(nats.errors.Error):
        await nats.connect(production_nats.url, user="trainer", password="wrong", allow_reconnect=False)


@pytest.mark.parametrize("service", ["monitor", "gateway"])
def test_a_service_started_as_compose_starts_it_passes_compose_health_check(
    service, production_nats, s3_server, tmp_path
):
    """compose.yml's command and environment (hosts, folders and the port changed for this machine; one
    gateway worker on 2 cores); then compose's own health-check command, run as Docker would run it."""
    spec = compose.load()["services"][service]
    env = compose.environment(service, compose_variables(production_nats.passwords, s3_server))
    port = free_port()
    env |= {
        "CONVEYOR_STATE_DIR": str(tmp_path / "state"),
        "CONVEYOR_NATS_URL": production_nats.url,
        "CONVEYOR_S3_ENDPOINT": s3_server.endpoint,
        "CONVEYOR_HTTP_PORT": str(port),
        "CONVEYOR_SERVING_MODEL_REPOSITORY": str(tmp_path / "models"),
        "CONVEYOR_GATEWAY_WORKERS": "1",
    }
    del env["CONVEYOR_OTLP_ENDPOINT"]  # no collector here
    assert env["CONVEYOR_HTTP_HOST"] == "0.0.0.0"
    (tmp_path / "models").mkdir()
    check = [sys.executable if a == "python" else a for a in spec["healthcheck"]["test"][1:]]
    check = [a.replace(f":{spec['environment']['CONVEYOR_HTTP_PORT']}/", f":{port}/") for a in check]
    argv = [sys.executable if a == "python" else a for a in spec["command"]]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "MLFLOW_", "AWS_"))}
    log = tmp_path / f"{service}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=base | env, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            assert proc.poll() is None, log.read_text()[-3000:]
            if subprocess.run(check, env=base, capture_output=True, timeout=10).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"{service} never passed its health check:\n{log.read_text()[-3000:]}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode in (0, -15), log.read_text()[-3000:]  # SIGTERM drains and exits


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[str]:
    """A fresh database on the PostgreSQL at CONVEYOR_TEST_POSTGRES_URL (default: this machine's), dropped
    after; the test is skipped, saying why, when none answers."""
    import psycopg
    from psycopg import sql

    try:
        admin = psycopg.connect(POSTGRES_URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(reason=f"no PostgreSQL at {POSTGRES_URL} ({exc}); set CONVEYOR_TEST_POSTGRES_URL to one")
    name = "conveyor_mlflow_" + secrets.token_hex(4)
    with admin.cursor() as cursor:
        cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


@pytest.fixture(scope="module")
def production_mlflow(
    postgres_database: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``mlflow server`` with compose.yml's command and environment: PostgreSQL behind it, artifacts on S3."""
    root = tmp_path_factory.mktemp("production-mlflow")
    service = compose.load()["services"]["mlflow"]
    port = free_port()
    env = compose.environment("mlflow", compose_variables({u: "x" for u in USERS}, s3_server))
    env |= {
        "MLFLOW_BACKEND_STORE_URI": postgres_database,
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://mlflow/{root.name}",
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",  # a 2-core machine; the container's 4 change nothing the test checks
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        "MLFLOW_S3_IGNORE_TLS": "true",
    }
    argv = [find_binary(service["command"][0]) or service["command"][0], *service["command"][1:]]
    part = Part(
        name="mlflow",
        argv=argv,
        env=env,
        health=HealthCheck(url=f"http://127.0.0.1:{port}/health"),
        cwd=root,
        ports={"mlflow_port": port},
        ready_timeout_s=120,  # the first start creates MLflow's tables in PostgreSQL
    )
    with run_part(part, root / "mlflow.log"):
        yield f"http://127.0.0.1:{port}"


def test_the_trainer_and_registry_adapters_work_on_mlflow_with_postgresql(
    production_mlflow, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", production_mlflow)
    model = "pg-" + secrets.token_hex(3)
    tracker = MlflowTracker(production_mlflow)
    run_id = tracker.start(model, "pg-run", {"epochs": 2, "lr": 0.01}, {"conveyor.dataset": "digits@1"})
    tracker.log_metrics(run_id, {"val_accuracy": 0.5}, step=0)
    tracker.log_metrics(run_id, {"val_accuracy": 0.75, "test_accuracy": 0.9, "test_macro_f1": 0.88}, step=1)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "labels.json").write_text('["0", "1"]')
    uri = tracker.log_artifacts(run_id, tmp_path / "model")
    tracker.finish(run_id)
    version = tracker.register(model, run_id, {"conveyor.dataset": "digits@1"})
    assert version == 1
    latest = tracker.latest_version(model)
    assert latest is not None and (latest.version, latest.run_id) == (1, run_id)
    history = tracker.client.get_metric_history(run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.75)]
    path = tracker.client.download_artifacts(run_id, "model/labels.json", str(tmp_path / "back"))
    assert Path(path).read_text() == '["0", "1"]' and uri.endswith("/model")

    store = ModelStore(production_mlflow)
    state = store.state(model)
    assert state.aliases == {"candidate": 1}
    change = plan_transition(state.aliases, state.tags, 1, "staging", RolloutPolicy(), manual=True)
    store.apply(model, change, change.entry(model, actor="admin:tests", reason="on PostgreSQL"), seq=1)
    after = store.state(model)
    assert after.aliases.get("staging") == 1 and "candidate" not in after.aliases
    assert any(key.startswith("conveyor.audit") for key in after.versions[1].tags)
    metrics = store.run_metrics(after.versions[1])
    assert metrics is not None and metrics.test_accuracy == 0.9
