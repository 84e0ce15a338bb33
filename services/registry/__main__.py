"""``python -m services.registry``: run the registry service until SIGTERM."""

from services.registry.app import build
from services.registry.config import RegistrySettings
from services.runtime.service import serve
from services.runtime.telemetry import setup_logging

settings = RegistrySettings()
setup_logging(settings)
app, _ = build(settings)
serve(app, settings)
