"""Settings of the gateway (environment ``CONVEYOR_...``; its own are ``CONVEYOR_GATEWAY_...``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from services.runtime.config import LOCAL_DEFAULT_SECRETS, Settings

__all__ = ["GatewaySettings"]


class GatewaySettings(Settings):
    service: str = "gateway"
    gateway_port: int = Field(
        18180, ge=0, le=65535, description="the gateway's HTTP port (CONVEYOR_HTTP_PORT, when set, wins)"
    )
    gateway_workers: int = Field(2, ge=1, le=64, description="uvicorn worker processes")
    triton_grpc_url: str = Field("127.0.0.1:18101", description="Triton's gRPC endpoint (host:port)")
    gateway_grpc_channels: int = Field(
        4, ge=1, le=64, description="pooled gRPC channels to Triton per worker"
    )
    gateway_shared_memory_mb: int = Field(
        64,
        ge=0,
        description="per worker: inputs go to Triton through this host's shared memory (regions up to this "
        "many MiB in all) when Triton can open it (same host, or a shared IPC namespace); 0: gRPC bytes only",
    )
    gateway_triton_in_flight: int = Field(
        2,
        ge=0,
        description="per worker and model version: Triton requests out at once; a request that comes while "
        "all are out waits, and the waiting go together as one request (up to the model's max batch size) as "
        "soon as one returns; 0: each request goes alone, at once",
    )
    gateway_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="keys accepted for predict and feedback (X-API-Key or Bearer); empty: open (local only)",
    )
    gateway_max_body_bytes: int = Field(16 * 1024**2, ge=1024, description="larger requests get 413")
    gateway_max_images: int = Field(64, ge=1, description="images in one predict request")
    gateway_request_timeout_s: float = Field(10.0, gt=0, description="a request taking longer gets 504")
    gateway_shadow_queue: int = Field(256, ge=1, description="mirrored requests waiting; more are dropped")
    gateway_inference_sample_rate: float = Field(
        1.0, ge=0, le=1, description="fraction of predictions in inference.logged"
    )
    gateway_trace_sample_rate: float = Field(
        0.01, ge=0, le=1, description="fraction of predict requests traced"
    )
    gateway_keep_images: bool = Field(
        True, description="keep each predicted image a while (NATS object store) so feedback can label it"
    )
    incoming_bucket: str = Field("incoming", description="where feedback images land as labelled data")
    serving_model_repository: Path | None = Field(
        None, description="Triton's model repository (serving specs); unset: <state dir>/triton/models"
    )

    @property
    def port(self) -> int:
        return self.http_port or self.gateway_port

    @property
    def model_repository(self) -> Path:
        return self.serving_model_repository or self.state_dir / "triton" / "models"

    @model_validator(mode="after")
    def _keys_in_production(self) -> GatewaySettings:
        if self.mode != "production":
            return self
        if not self.gateway_api_keys:
            raise ValueError("CONVEYOR_GATEWAY_API_KEYS must list at least one key in production mode")
        if any(key.get_secret_value() in LOCAL_DEFAULT_SECRETS for key in self.gateway_api_keys):
            raise ValueError("CONVEYOR_GATEWAY_API_KEYS holds a placeholder key: replace it with a real one")
        return self
