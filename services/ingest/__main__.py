"""``python -m services.ingest``: run the ingest service until SIGTERM."""

from services.ingest.app import build
from services.ingest.config import IngestSettings
from services.runtime.service import serve
from services.runtime.telemetry import setup_logging

settings = IngestSettings()
setup_logging(settings)
app, _ = build(settings)
serve(app, settings)
