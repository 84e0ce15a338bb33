"""Settings of the embedded stack: one port per server, URLs derived from them, state under ``.conveyor/``.

Every port is an environment variable (``CONVEYOR_NATS_PORT``, ``CONVEYOR_S3_PORT``, ...), so a stack can
live beside a user's own NATS, MinIO, MLflow or Triton. The URLs of ``Settings`` (``nats_url``,
``s3_endpoint``, ...) are derived from these ports unless set explicitly: the embedded stack listens on the
ports, while an explicit ``CONVEYOR_NATS_URL`` (and user/password) points the CLI at another server.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from deploy.local.natsconf import ADMIN_USER
from deploy.local.secrets import LocalSecrets
from services.runtime.config import Settings

__all__ = ["StackSettings"]


class StackSettings(Settings):
    """What ``conveyor up``, the supervisor and ``conveyor status`` read (env prefix ``CONVEYOR_``)."""

    host: str = Field("127.0.0.1", description="interface every part of the embedded stack binds to")
    nats_port: int = Field(14222, ge=1, le=65535)
    nats_http_port: int = Field(18222, ge=1, le=65535, description="nats-server monitoring (/healthz, /varz)")
    s3_port: int = Field(19100, ge=1, le=65535)
    mlflow_port: int = Field(15100, ge=1, le=65535)
    triton_http_port: int = Field(18100, ge=1, le=65535)
    triton_grpc_port: int = Field(18101, ge=1, le=65535)
    triton_metrics_port: int = Field(18102, ge=1, le=65535)
    gateway_port: int = Field(18180, ge=1, le=65535)
    # One health/metrics port per service that the supervisor runs (deploy.local.services.STACK_SERVICES).
    ingest_port: int = Field(18191, ge=1, le=65535)
    trainer_port: int = Field(18192, ge=1, le=65535)
    registry_port: int = Field(18193, ge=1, le=65535)
    serving_port: int = Field(18194, ge=1, le=65535)
    monitor_port: int = Field(18195, ge=1, le=65535)

    mlflow_workers: int = Field(1, ge=1, le=8, description="uvicorn workers of the MLflow server")
    mlflow_experiment: str = Field("conveyor", description="experiment that receives the services' traces")
    up_timeout_s: float = Field(90.0, gt=0, description="how long `conveyor up` waits for every part")
    stop_timeout_s: float = Field(15.0, gt=0, description="SIGTERM grace per process before SIGKILL")

    @model_validator(mode="after")
    def _derive_urls(self) -> StackSettings:
        self.state_dir = self.state_dir.expanduser().resolve()
        for name, url in self._port_urls().items():
            if name not in self.model_fields_set:
                setattr(self, name, url)
        return self

    def _port_urls(self) -> dict[str, str]:
        return {
            "nats_url": f"nats://{self.host}:{self.nats_port}",
            "s3_endpoint": f"http://{self.host}:{self.s3_port}",
            "mlflow_url": f"http://{self.host}:{self.mlflow_port}",
            "triton_url": f"http://{self.host}:{self.triton_http_port}",
            "gateway_url": f"http://{self.host}:{self.gateway_port}",
            "registry_url": f"http://{self.host}:{self.registry_port}",
        }

    def embedded(self) -> StackSettings:
        """A copy with the URLs of the embedded stack's own ports, even where the environment set others."""
        return self.model_copy(update=self._port_urls())

    # Where things live under the state dir.
    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "supervisor.pid"

    @property
    def nats_monitor_url(self) -> str:
        return f"http://{self.host}:{self.nats_http_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.host}:{self.triton_grpc_port}"

    @property
    def triton_metrics_url(self) -> str:
        return f"http://{self.host}:{self.triton_metrics_port}/metrics"

    def with_secrets(self, secrets: LocalSecrets) -> StackSettings:
        """A copy that uses the stack's generated credentials wherever the environment set none.

        The NATS user becomes ``admin`` (what the CLI and operators use).
        """
        update: dict[str, object] = {}
        defaults = {
            "nats_user": ADMIN_USER,
            "nats_password": SecretStr(secrets.nats[ADMIN_USER]),
            "s3_access_key": secrets.s3_access_key,
            "s3_secret_key": SecretStr(secrets.s3_secret_key),
            "admin_token": SecretStr(secrets.admin_token),
        }
        for name, value in defaults.items():
            if name not in self.model_fields_set:
                update[name] = value
        return self.model_copy(update=update)
