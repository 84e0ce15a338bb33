"""Settings of the monitor (environment ``CONVEYOR_...``; its own are ``CONVEYOR_MONITOR_...``).

Window sizes and thresholds are per model, in its policy (``drift`` and ``canary``); these are the process's.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.runtime.config import Settings

__all__ = ["MonitorSettings"]


class MonitorSettings(Settings):
    service: str = "monitor"
    monitor_tick_s: float = Field(
        1.0, gt=0, description="how often windows are checked for their time limit and canaries for a verdict"
    )
    monitor_embedding_sample: int = Field(
        200, ge=10, le=5000, description="embeddings kept per window (a reservoir) for the MMD test"
    )
    monitor_permutations: int = Field(200, ge=20, description="permutations of the MMD test")
    monitor_max_versions: int = Field(
        200, ge=1, description="model versions tracked at once; the least recently seen is dropped beyond"
    )
    monitor_history: int = Field(20, ge=1, description="closed windows kept per version for `conveyor drift`")
    monitor_log_to_mlflow: bool = Field(True, description="log each window's statistics on the version's run")

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "monitor"
