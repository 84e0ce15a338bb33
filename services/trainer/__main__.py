"""``python -m services.trainer``: run the trainer service until SIGTERM."""

from services.runtime.service import serve
from services.runtime.telemetry import setup_logging
from services.trainer.app import build
from services.trainer.config import TrainerSettings

settings = TrainerSettings()
setup_logging(settings)
app, _ = build(settings)
serve(app, settings)
