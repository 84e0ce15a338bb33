"""``python -m services.serving.gateway``: the gateway under uvicorn, CONVEYOR_GATEWAY_WORKERS workers."""

import uvicorn

from services.runtime.telemetry import setup_logging
from services.serving.gateway.config import GatewaySettings

settings = GatewaySettings()
setup_logging(settings)
uvicorn.run(
    "services.serving.gateway.app:create_app",
    factory=True,
    host="127.0.0.1",
    port=settings.port,
    workers=settings.gateway_workers,
    log_level="warning",
    access_log=False,
)
