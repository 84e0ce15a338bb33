"""Typed settings shared by every service and the CLI (environment prefix ``CONVEYOR_``).

Local mode (the embedded stack, tests) may run on generated or default credentials; production mode refuses
to start unless every secret is set and none is a local default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.names import Subjects, inbox_prefix, validate_prefix

__all__ = ["LOCAL_DEFAULT_SECRETS", "NATS_SAFE_PASSWORD", "Settings"]

# Defaults that are fine on a laptop and refused in production, as is
# deploy/compose/.env.example's placeholder.
LOCAL_DEFAULT_SECRETS = {"conveyor-local", "conveyor-local-secret", "conveyor-admin", "change-me"}
NATS_SAFE_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]{15,}")


class Settings(BaseSettings):
    """What every process reads; each service subclasses it with its own fields."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore", env_file=None)

    mode: Literal["local", "production"] = "local"
    service: str = Field("conveyor", description="the name this process reports in logs, traces and metrics")
    subject_prefix: str = Field("conveyor", description="first token of every subject; keeps installs apart")
    state_dir: Path = Field(Path(".conveyor"), description="where the embedded stack keeps its data and logs")

    nats_url: str = "nats://127.0.0.1:14222"
    nats_user: str | None = None
    nats_password: SecretStr | None = None

    s3_endpoint: str = "http://127.0.0.1:19100"
    s3_access_key: str = "conveyor-local"
    s3_secret_key: SecretStr = SecretStr("conveyor-local-secret")
    s3_region: str = "us-east-1"

    mlflow_url: str = "http://127.0.0.1:15100"
    triton_url: str = "http://127.0.0.1:18100"
    gateway_url: str = "http://127.0.0.1:18180"
    registry_url: str = Field("http://127.0.0.1:18193", description="the registry's admin API (the CLI's)")
    admin_token: SecretStr = SecretStr("conveyor-admin")

    otlp_endpoint: str | None = Field(None, description="OTLP/HTTP traces endpoint; unset: no export")
    otlp_headers: dict[str, str] = Field(default_factory=dict)
    trace_sample_rate: float = Field(1.0, ge=0, le=1, description="fraction of new traces recorded")
    log_level: str = "INFO"
    http_port: int = Field(0, description="health, readiness and /metrics; 0 picks a free port")
    http_host: str = Field(
        "127.0.0.1", description="interface the HTTP endpoints listen on (0.0.0.0 in a container)"
    )

    inference_max_bytes: int = Field(
        2 * 1024**3, ge=1024**2, description="size limit of the inference stream (JetStream reserves it)"
    )
    inference_max_age_s: float = Field(7 * 24 * 3600, gt=0, description="age limit of the inference stream")
    max_deliveries: int = Field(5, ge=1, description="deliveries before a failing message is dead-lettered")
    retry_base_delay_s: float = Field(1.0, gt=0, description="first nak delay; doubles per delivery")
    retry_max_delay_s: float = Field(60.0, gt=0)
    ack_wait_s: float = Field(30.0, gt=0, description="JetStream ack wait; long handlers send progress")

    @field_validator("subject_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return validate_prefix(value)

    @model_validator(mode="after")
    def _no_default_secrets_in_production(self) -> Settings:
        if self.mode != "production":
            return self
        problems = []
        secrets = {
            "CONVEYOR_S3_SECRET_KEY": self.s3_secret_key,
            "CONVEYOR_ADMIN_TOKEN": self.admin_token,
            "CONVEYOR_NATS_PASSWORD": self.nats_password,
        }
        for env, secret in secrets.items():
            if secret is None or secret.get_secret_value() in LOCAL_DEFAULT_SECRETS:
                problems.append(f"{env} must be set to a real secret in production mode")
        if self.s3_access_key in LOCAL_DEFAULT_SECRETS:
            problems.append("CONVEYOR_S3_ACCESS_KEY must be set in production mode")
        password = self.nats_password.get_secret_value() if self.nats_password else None
        if password is not None and not NATS_SAFE_PASSWORD.fullmatch(password):
            problems.append(
                "CONVEYOR_NATS_PASSWORD must start with a letter and hold 16 or more letters, digits, '-' "
                "or '_': deploy/compose's nats-server reads the same password from its environment and "
                "parses other values as numbers, dates or booleans (then nobody can log in)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subject_prefix)

    def nats_connect_kwargs(self) -> dict[str, Any]:
        """``nats.connect`` keywords: the server, this user's credentials and its inbox prefix."""
        password = self.nats_password.get_secret_value() if self.nats_password else None
        return {
            "servers": [self.nats_url],
            "user": self.nats_user,
            "password": password,
            "inbox_prefix": inbox_prefix(self.nats_user),
        }
