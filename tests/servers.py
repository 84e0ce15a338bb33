"""Real servers for tests, started by the same ``Part`` builders as ``conveyor up`` (deploy.local.builders).

Each ``run_*`` context manager starts one server on free ports under a directory, waits until it is healthy
(raising ``PartError`` with the tail of its log if not), yields a small dataclass with its URL, ports and
credentials, and stops it (SIGTERM, then SIGKILL) on exit. ``tests/conftest.py`` wraps them in session-scoped
fixtures; use them directly when a test needs a server of its own (for example to restart it).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from minio import Minio

from contracts.names import SERVICES, Subjects, inbox_prefix
from deploy.local.builders import BUCKETS, mlflow_part, nats_part, s3_part, triton_part
from deploy.local.natsconf import ADMIN_USER
from deploy.local.parts import Part, check_ports, free_port, spawn, stop_process, wait_healthy

__all__ = [
    "MlflowServer",
    "NatsServer",
    "S3Server",
    "TritonServer",
    "free_stack_env",
    "run_mlflow",
    "run_nats",
    "run_part",
    "run_s3",
    "run_triton",
    "wait_until_ok",
]


@contextmanager
def run_part(part: Part, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``part`` with its output in ``log``, wait until healthy, yield the process, stop it after."""
    check_ports(part)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = spawn(part, out)
    try:
        wait_healthy(part, proc, log)
        yield proc
    finally:
        stop_process(proc.pid, timeout=10)
        proc.wait()


@dataclass(frozen=True)
class NatsServer:
    """A nats-server with JetStream; ``passwords`` has one entry per user (``admin`` and every service).

    Service users have their rights under every subject prefix (``NatsConfig.any_prefix``), so tests log
    in as a service with their own fresh ``prefix``.
    """

    url: str
    port: int
    http_port: int
    admin_user: str
    admin_password: str
    passwords: dict[str, str]
    config_path: Path
    store_dir: Path
    log_path: Path

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def connect_kwargs(self, user: str = ADMIN_USER) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` as ``user``."""
        return {
            "servers": [self.url],
            "user": user,
            "password": self.passwords[user],
            "inbox_prefix": inbox_prefix(user),  # a service user may subscribe to its own inbox only
        }

    async def provision(self, prefix: str, *, inference_max_bytes: int = 16 * 1024**2) -> list[str]:
        """The streams, KV buckets and object store of ``prefix`` (with MinIO's notification stream on
        ``<prefix>.minio.events``), made by the admin user as ``conveyor up`` and ``conveyor streams`` make
        them: service users may not."""
        import nats

        from services.runtime.streams import ensure_streams

        nc = await nats.connect(**self.connect_kwargs())
        try:
            return await ensure_streams(
                nc.jetstream(),
                Subjects(prefix),
                inference_max_bytes=inference_max_bytes,
                minio_subject=f"{prefix}.minio.events",
            )
        finally:
            await nc.close()


@contextmanager
def run_nats(root: Path) -> Iterator[NatsServer]:
    """nats-server with JetStream under ``root``; service users keep their rights under every prefix."""
    port, http_port = free_port(), free_port()
    passwords = {user: secrets.token_urlsafe(12) for user in (ADMIN_USER, *SERVICES)}
    part = nats_part(root, port, http_port, Subjects(), passwords, any_prefix=True)
    with run_part(part, root / "nats.log"):
        yield NatsServer(
            url=f"nats://127.0.0.1:{port}",
            port=port,
            http_port=http_port,
            admin_user=ADMIN_USER,
            admin_password=passwords[ADMIN_USER],
            passwords=passwords,
            config_path=root / "nats.conf",
            store_dir=root / "jetstream",
            log_path=root / "nats.log",
        )


@dataclass(frozen=True)
class S3Server:
    """``rclone serve s3`` over ``root``; the buckets of ``deploy.local.builders.BUCKETS`` exist."""

    endpoint: str
    port: int
    access_key: str
    secret_key: str
    root: Path
    log_path: Path
    region: str = "us-east-1"  # rclone's S3 needs it in the minio client
    buckets: tuple[str, ...] = BUCKETS

    @property
    def host(self) -> str:
        """``host:port`` as the minio client wants it."""
        return self.endpoint.removeprefix("http://")

    def client(self) -> Minio:
        """A minio client for this server."""
        return Minio(
            self.host,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
        )


@contextmanager
def run_s3(root: Path) -> Iterator[S3Server]:
    """An S3 endpoint over the folder ``root`` with fresh keys."""
    port = free_port()
    access, secret = "test-" + secrets.token_hex(4), secrets.token_urlsafe(18)
    with run_part(s3_part(root, port, access, secret), root.parent / f"{root.name}.log"):
        yield S3Server(
            f"http://127.0.0.1:{port}", port, access, secret, root, root.parent / f"{root.name}.log"
        )


@dataclass(frozen=True)
class MlflowServer:
    """``mlflow server`` on sqlite; artifacts go through its proxy to ``artifacts`` on ``s3``."""

    url: str
    port: int
    artifacts: str
    root: Path
    log_path: Path
    s3: S3Server

    def client_env(self) -> dict[str, str]:
        """Environment for MLflow clients (tracking URI, and S3 access for direct artifact reads)."""
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_DEFAULT_REGION": self.s3.region,
        }


@contextmanager
def run_mlflow(root: Path, s3: S3Server, artifacts: str | None = None) -> Iterator[MlflowServer]:
    """MLflow with its sqlite store under ``root`` and artifacts on ``s3`` (``s3://mlflow/<root name>``)."""
    port = free_port()
    artifacts = artifacts or f"s3://mlflow/{root.name}"
    part = mlflow_part(root, port, s3.endpoint, s3.access_key, s3.secret_key, artifacts=artifacts)
    with run_part(part, root.parent / f"{root.name}.log"):
        yield MlflowServer(
            f"http://127.0.0.1:{port}", port, artifacts, root, root.parent / f"{root.name}.log", s3
        )


@dataclass(frozen=True)
class TritonServer:
    """tritonserver in explicit model-control mode on ``model_repository`` (empty at start)."""

    url: str
    grpc_url: str
    metrics_url: str
    http_port: int
    grpc_port: int
    metrics_port: int
    model_repository: Path
    log_path: Path
    pid: int


@contextmanager
def run_triton(root: Path) -> Iterator[TritonServer]:
    """The bundled tritonserver with its repository at ``root/models`` and the Python backend ready."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    with run_part(triton_part(root, http, grpc, metrics), root.parent / f"{root.name}.log") as proc:
        yield TritonServer(
            url=f"http://127.0.0.1:{http}",
            grpc_url=f"127.0.0.1:{grpc}",
            metrics_url=f"http://127.0.0.1:{metrics}/metrics",
            http_port=http,
            grpc_port=grpc,
            metrics_port=metrics,
            model_repository=root / "models",
            log_path=root.parent / f"{root.name}.log",
            pid=proc.pid,
        )


STACK_PORT_SETTINGS = (
    "nats_port",
    "nats_http_port",
    "s3_port",
    "mlflow_port",
    "triton_http_port",
    "triton_grpc_port",
    "triton_metrics_port",
    "gateway_port",
    *(f"{service}_port" for service in SERVICES),
)


def free_stack_env(state_dir: Path) -> dict[str, str]:
    """Environment for a whole ``conveyor up`` in ``state_dir`` on free ports (merged over ``os.environ``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["CONVEYOR_STATE_DIR"] = str(state_dir)
    ports: set[int] = set()
    for setting in STACK_PORT_SETTINGS:
        port = free_port()
        while port in ports:
            port = free_port()
        ports.add(port)
        env[f"CONVEYOR_{setting.upper()}"] = str(port)
    return env


def gateway_env(prefix: str, state_dir: Path, nats: NatsServer, triton: TritonServer) -> dict[str, str]:
    """Environment of a ``python -m services.serving.gateway`` (two workers) on these servers, over
    ``os.environ`` without its ``CONVEYOR_*``; add ``CONVEYOR_GATEWAY_PORT`` and any other setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")} | {
        "CONVEYOR_SUBJECT_PREFIX": prefix,
        "CONVEYOR_STATE_DIR": str(state_dir),
        "CONVEYOR_NATS_URL": nats.url,
        "CONVEYOR_NATS_USER": "serving",
        "CONVEYOR_NATS_PASSWORD": nats.passwords["serving"],
        "CONVEYOR_TRITON_GRPC_URL": triton.grpc_url,
        "CONVEYOR_SERVING_MODEL_REPOSITORY": str(triton.model_repository),
        "CONVEYOR_GATEWAY_WORKERS": "2",
        "CONVEYOR_INFERENCE_MAX_BYTES": str(16 * 1024**2),
    }


async def wait_until_ok(
    http: httpx.AsyncClient, path: str, *, seconds: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Poll ``path`` every 0.1 s until it answers 200; ``AssertionError`` when ``alive()`` turns false (the
    process exited) or ``seconds`` pass first."""
    for _ in range(int(seconds * 10)):
        assert alive(), f"the server behind {http.base_url} exited"
        try:
            if (await http.get(path)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{http.base_url}{path} did not answer 200 within {seconds:.0f} s")
