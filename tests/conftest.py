"""Session-wide fixtures: real servers on free ports in temp dirs (see tests/servers.py), and a fresh prefix.

Every server starts once per test session, the first time a test asks for it, and stops at the end. Tests
stay apart by using their own ``prefix`` (subjects, streams, KV buckets) and their own names and object keys.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from tests.servers import (
    MlflowServer,
    NatsServer,
    S3Server,
    TritonServer,
    run_mlflow,
    run_nats,
    run_s3,
    run_triton,
)

# Every test makes the streams of its own prefix, and JetStream reserves the inference stream's size limit
# on disk for each: keep it small so a whole session fits on a small disk (services read the environment).
os.environ.setdefault("CONVEYOR_INFERENCE_MAX_BYTES", str(16 * 1024**2))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream, rendered by ``deploy.local.natsconf`` like the embedded stack's.

    Log in as ``admin`` (``nats_server.connect_kwargs()``) or as a service
    (``nats_server.connect_kwargs("ingest")``, password in ``nats_server.passwords``). Service users have
    their rights under every prefix (``*.dataset.versioned.>`` for ingest, ...), so a service user keeps
    exactly its own rights on the test's fresh ``prefix``: a
    permission test publishes as a service on ``prefix`` and expects another service's event to be refused.
    Service users may not create streams: a test that asks for ``nats_server`` and ``prefix`` gets its
    prefix's streams made by the admin user first (``provisioned``), as ``conveyor up`` makes them.
    """
    with run_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``rclone serve s3`` with the buckets incoming, quarantine, dvc and mlflow; ``s3_server.client()`` is
    a minio client (region us-east-1). Use object keys under your test's ``prefix``."""
    with run_s3(tmp_path_factory.mktemp("s3") / "data") as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[MlflowServer]:
    """An MLflow server (sqlite) whose artifacts go through its proxy to ``s3://mlflow/...`` on ``s3_server``;
    ``mlflow_server.client_env()`` is the environment for MLflow clients. Use fresh experiment/model names."""
    with run_mlflow(tmp_path_factory.mktemp("mlflow") / "mlflow", s3_server) as server:
        yield server


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The bundled tritonserver, explicit model control, on the empty repository
    ``triton_server.model_repository``; load models with its repository API under fresh names."""
    with run_triton(tmp_path_factory.mktemp("triton") / "triton") as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """A fresh subject prefix (``t`` + 8 hex digits) so that tests never see each other's events."""
    return "t" + secrets.token_hex(4)


@pytest.fixture
async def provisioned(nats_server: NatsServer, prefix: str) -> list[str]:
    """The streams of ``prefix``, made by the admin user (``NatsServer.provision``)."""
    return await nats_server.provision(
        prefix, inference_max_bytes=int(os.environ["CONVEYOR_INFERENCE_MAX_BYTES"])
    )


@pytest.fixture(autouse=True)
def _provision_the_prefix(request: pytest.FixtureRequest) -> None:
    if {"nats_server", "prefix"} <= set(request.fixturenames):
        request.getfixturevalue("provisioned")
