"""One supervised process: its ``Part``, its rotated log file and what the supervisor knows about it."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import IO, Any

from deploy.local.parts import Part, spawn
from deploy.local.state import process_identity

__all__ = ["LOG_BACKUPS", "LOG_MAX_BYTES", "Child", "now_iso", "rotating_logger"]

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def rotating_logger(name: str, path: Path) -> logging.Logger:
    """A logger that writes raw lines to ``path``, rotated at 10 MB with 3 backups."""
    logger = logging.getLogger(f"conveyor.part.{name}.{path}")
    if not logger.handlers:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def _pump(stream: IO[bytes], logger: logging.Logger) -> None:
    for raw in iter(stream.readline, b""):
        logger.info(raw.decode("utf-8", errors="replace").rstrip("\n"))
    stream.close()


@dataclass
class Child:
    """One supervised part and what the supervisor knows about it."""

    part: Part
    log_path: Path
    logger: logging.Logger
    proc: subprocess.Popen[bytes] | None = None
    status: str = "pending"  # pending, starting, healthy, unhealthy, restarting, failed, stopped
    restarts: int = 0
    failures: int = 0
    started: float = 0.0
    started_at: str | None = None
    next_start: float = 0.0
    healthy_after_s: float | None = None
    last_exit: int | None = None
    last_health: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        self.proc = spawn(self.part, subprocess.PIPE)
        assert self.proc.stdout is not None
        threading.Thread(target=_pump, args=(self.proc.stdout, self.logger), daemon=True).start()
        self.started, self.started_at, self.status = time.monotonic(), now_iso(), "starting"
        self.note("started", pid=self.proc.pid)

    def note(self, event: str, level: str = "info", **fields: Any) -> None:
        """A line of the supervisor's in the part's log, as the services write theirs (JSON, ``service``
        "supervisor"), so that a service's log holds JSON lines only."""
        line = {"service": "supervisor", "part": self.part.name, "event": event, **fields}
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # as structlog stamps the services' lines
        self.logger.info(json.dumps({**line, "level": level, "timestamp": at}))

    def as_json(self) -> dict[str, Any]:
        pid = self.proc.pid if self.proc and self.proc.poll() is None else None
        return {
            "name": self.part.name,
            "kind": self.part.kind,
            "pid": pid,
            "identity": process_identity(pid) if pid else None,
            "ports": self.part.ports,
            "health": self.part.health.describe(),
            "status": self.status,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "started_at": self.started_at,
            "healthy_after_s": self.healthy_after_s,
            "log": str(self.log_path),
            **self.extra,
        }
