"""``python -m services.serving.gateway``: the gateway under uvicorn, CONVEYOR_GATEWAY_WORKERS workers.

Prometheus runs in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, a fresh folder under the state dir unless
set), so ``/metrics`` on any worker reports the counts of all of them.
"""

import os
import shutil

import uvicorn

from services.runtime.telemetry import setup_logging
from services.serving.gateway.config import GatewaySettings
from services.serving.gateway.protocol import NoDelayHttpToolsProtocol

settings = GatewaySettings()
setup_logging(settings)
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    metrics_dir = settings.state_dir.resolve() / "gateway" / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
uvicorn.run(
    "services.serving.gateway.app:create_app",
    factory=True,
    host=settings.http_host,
    port=settings.port,
    workers=settings.gateway_workers,
    http=NoDelayHttpToolsProtocol,  # TCP_NODELAY also when the socket is shared with the workers
    loop="uvloop",
    log_level="warning",
    log_config=None,  # uvicorn's records go to the JSON handler of setup_logging (create_app, in each worker)
    access_log=False,
)
