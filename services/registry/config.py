"""Settings of the registry service (environment ``CONVEYOR_...``; its own are ``CONVEYOR_REGISTRY_...``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.runtime.config import Settings

__all__ = ["RegistrySettings"]


class RegistrySettings(Settings):
    service: str = "registry"
    torch_threads: int = Field(0, ge=0, description="torch CPU threads for the gates (0: torch's default)")
    registry_gate_concurrency: int = Field(
        1, ge=1, description="models gated at once (each loads a model and times it on the CPU)"
    )

    @property
    def cache_dir(self) -> Path:
        """Clones of data repositories (the champions' test splits) and downloaded challengers."""
        return self.state_dir / "registry" / "cache"
