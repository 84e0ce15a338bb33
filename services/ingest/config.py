"""Settings of the ingest service (environment ``CONVEYOR_...``; its own are ``CONVEYOR_INGEST_...``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from services.runtime.config import Settings

__all__ = ["IngestSettings"]


class IngestSettings(Settings):
    service: str = "ingest"
    incoming_bucket: str = Field("incoming", description="where users drop <dataset>/<label>/<file>")
    quarantine_bucket: str = Field("quarantine", description="where rejected files go, with a JSON reason")
    dvc_bucket: str = Field("dvc", description="the DVC remote's bucket")
    ingest_trigger: str = Field(
        "poll", description="poll: list the bucket every poll interval (any S3); minio: MinIO notifications"
    )
    ingest_notify_subject: str = Field(
        "", description="where MinIO publishes its bucket notifications (default <prefix>.minio.events)"
    )
    ingest_poll_interval_s: float = Field(2.0, gt=0, description="how often the poller lists the bucket")
    ingest_quiet_window_s: float = Field(3.0, ge=0, description="a batch closes after this quiet time")
    ingest_max_batch: int = Field(10_000, ge=1, description="a batch closes when it holds this many files")
    ingest_max_bytes: int = Field(500_000_000, ge=1, description="largest file accepted, in bytes")
    ingest_max_pixels: int = Field(250_000_000, ge=1, description="most pixels a file may declare")
    ingest_split: tuple[int, int, int] = Field((80, 10, 10), description="train/val/test percentages")
    ingest_repo_dir: Path | None = Field(None, description="default <state>/ingest/repo")
    ingest_git_remote: str = Field("", description="git remote of the data repository (default a bare repo)")

    @model_validator(mode="after")
    def _defaults(self) -> IngestSettings:
        if sum(self.ingest_split) != 100:
            raise ValueError(f"CONVEYOR_INGEST_SPLIT must add up to 100, not {self.ingest_split}")
        if self.ingest_trigger not in ("poll", "minio"):
            raise ValueError("CONVEYOR_INGEST_TRIGGER must be 'poll' or 'minio'")
        if not self.ingest_notify_subject:
            self.ingest_notify_subject = f"{self.subject_prefix}.minio.events"
        if self.ingest_repo_dir is None:
            self.ingest_repo_dir = self.state_dir / "ingest" / "repo"
        if not self.ingest_git_remote:
            self.ingest_git_remote = (self.state_dir / "ingest" / "data.git").resolve().as_uri()
        return self

    @property
    def dvc_remote(self) -> str:
        return f"s3://{self.dvc_bucket}/{self.subject_prefix}"

    @property
    def work_dir(self) -> Path:
        """Where files wait between download and DVC's cache (the same disk as the repository)."""
        path = self.repo_dir.parent / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def repo_dir(self) -> Path:
        assert self.ingest_repo_dir is not None
        return self.ingest_repo_dir
