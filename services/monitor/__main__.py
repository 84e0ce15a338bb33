"""``python -m services.monitor``: run the monitor service until SIGTERM."""

from services.monitor.app import build
from services.monitor.config import MonitorSettings
from services.runtime.service import serve
from services.runtime.telemetry import setup_logging

settings = MonitorSettings()
setup_logging(settings)
app, _ = build(settings)
serve(app, settings)
