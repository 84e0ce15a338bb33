"""The Conveyor services that ``conveyor up`` runs after the servers, and how each one is started.

To add a service to the embedded stack, add one line to ``STACK_SERVICES`` (``ServiceSpec("ingest")``): the
supervisor then runs ``python -m services.ingest`` as that service's NATS user, with the endpoints of the
stack, bounded threads, traces to MLflow, and its health endpoint on ``StackSettings.<name>_port``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from deploy.local.config import StackSettings
from deploy.local.parts import HealthCheck, Part
from deploy.local.secrets import LocalSecrets

__all__ = ["STACK_SERVICES", "ServiceSpec", "service_env", "service_part", "threads_per_service"]


@dataclass(frozen=True)
class ServiceSpec:
    """A service of ``services/<name>``; ``env`` adds variables of its own. ``module`` is what ``python -m``
    runs (default ``services.<name>``) and ``nats_user`` the NATS user it logs in as (default ``name``)."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 45.0
    module: str | None = None
    nats_user: str | None = None

    @property
    def user(self) -> str:
        return self.nats_user or self.name


# Start order. Later issues add their service here, one line each.
STACK_SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("ingest"),
    ServiceSpec("trainer"),
    ServiceSpec("registry"),
    ServiceSpec("serving"),
    # The gateway is serving's HTTP front: serving's NATS user (it publishes inference.logged).
    ServiceSpec("gateway", module="services.serving.gateway", nats_user="serving"),
    ServiceSpec("monitor"),
)


def threads_per_service(n_services: int) -> int:
    """Threads each service may use so that together they share the machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, n_services))


def service_env(
    spec: ServiceSpec,
    settings: StackSettings,
    secrets: LocalSecrets,
    *,
    threads: int,
    experiment_id: str | None,
) -> dict[str, str]:
    """The environment of one service process (every ``CONVEYOR_*`` it needs, plus thread limits)."""
    env = {
        "CONVEYOR_MODE": settings.mode,
        "CONVEYOR_SERVICE": spec.name,
        "CONVEYOR_SUBJECT_PREFIX": settings.subject_prefix,
        "CONVEYOR_STATE_DIR": str(settings.state_dir),
        "CONVEYOR_NATS_URL": settings.nats_url,
        "CONVEYOR_NATS_USER": spec.user,
        "CONVEYOR_NATS_PASSWORD": secrets.nats[spec.user],
        "CONVEYOR_S3_ENDPOINT": settings.s3_endpoint,
        "CONVEYOR_S3_ACCESS_KEY": secrets.s3_access_key,
        "CONVEYOR_S3_SECRET_KEY": secrets.s3_secret_key,
        "CONVEYOR_S3_REGION": settings.s3_region,
        "CONVEYOR_MLFLOW_URL": settings.mlflow_url,
        "CONVEYOR_TRITON_URL": settings.triton_url,
        "CONVEYOR_GATEWAY_URL": settings.gateway_url,
        "CONVEYOR_TRITON_GRPC_URL": settings.triton_grpc_url,
        "CONVEYOR_REGISTRY_URL": settings.registry_url,
        "CONVEYOR_ADMIN_TOKEN": secrets.admin_token,
        "CONVEYOR_HTTP_PORT": str(_port(spec, settings)),
        "CONVEYOR_LOG_LEVEL": settings.log_level,
        # MLflow clients inside the services talk to the same S3 store.
        "MLFLOW_TRACKING_URI": settings.mlflow_url,
        "MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint,
        "AWS_ACCESS_KEY_ID": secrets.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": secrets.s3_secret_key,
        "AWS_DEFAULT_REGION": settings.s3_region,
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)
    env["CONVEYOR_TORCH_THREADS"] = str(threads)  # services call torch.set_num_threads with it
    if experiment_id is not None:
        env["CONVEYOR_OTLP_ENDPOINT"] = f"{settings.mlflow_url}/v1/traces"
        env["CONVEYOR_OTLP_HEADERS"] = json.dumps({"x-mlflow-experiment-id": experiment_id})
    return {**env, **spec.env}


def _port(spec: ServiceSpec, settings: StackSettings) -> int:
    port = getattr(settings, f"{spec.name}_port", None)
    if not isinstance(port, int):
        raise ValueError(f"service {spec.name!r} has no port: add `{spec.name}_port` to deploy.local.config")
    return port


def service_part(
    spec: ServiceSpec,
    settings: StackSettings,
    secrets: LocalSecrets,
    *,
    threads: int,
    experiment_id: str | None,
) -> Part:
    """``python -m services.<name>``, healthy when its ``/healthz`` answers (204: connected to NATS)."""
    port = _port(spec, settings)
    return Part(
        name=spec.name,
        argv=[sys.executable, "-m", spec.module or f"services.{spec.name}"],
        env=service_env(spec, settings, secrets, threads=threads, experiment_id=experiment_id),
        health=HealthCheck(url=f"http://{settings.host}:{port}/healthz"),
        ports={f"{spec.name}_port": port},
        ready_timeout_s=spec.ready_timeout_s,
        kind="service",
    )
