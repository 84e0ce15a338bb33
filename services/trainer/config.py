"""Settings of the trainer service (environment ``CONVEYOR_...``; its own are ``CONVEYOR_TRAINER_...``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.runtime.config import Settings

__all__ = ["TrainerSettings"]


class TrainerSettings(Settings):
    service: str = "trainer"
    trainer_device: str | None = Field(None, description="cpu, cuda, cuda:1 ...; unset: CUDA when present")
    torch_threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    trainer_backlog: int = Field(64, ge=1, description="dataset events held at once, to coalesce a backlog")
    ack_wait_s: float = Field(60.0, gt=0, description="JetStream ack wait; the trainer sends progress")

    @property
    def cache_dir(self) -> Path:
        """Clones of data repositories and their DVC caches."""
        return self.state_dir / "trainer" / "cache"
