"""``python -m services.serving``: run serving's repository manager until SIGTERM."""

from services.runtime.service import serve
from services.runtime.telemetry import setup_logging
from services.serving.app import build
from services.serving.config import ServingSettings

settings = ServingSettings()
setup_logging(settings)
app, _ = build(settings)
serve(app, settings)
