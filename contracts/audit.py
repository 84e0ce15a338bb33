"""The audit log of a model: one ``AuditEntry`` per change, published on ``<prefix>.audit.<model>``.

The registry appends an entry for every stage transition, rejection, rollback and rollout change; the audit
stream (``Subjects.audit_stream``) denies deletes and purges, so the log is append-only. Integrators may
subscribe to it. The body is the entry's JSON (not a CloudEvents envelope); its position in the log is the
stream sequence of its message, which is therefore not a field of the entry.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.events import GateResult
from contracts.kv import Stage
from contracts.names import Name

__all__ = ["AUDIT_KINDS", "AuditEntry", "AuditKind"]

AuditKind = Literal["transition", "rollout", "rejection", "rollback"]
"""transition: a version moved to a stage; rollout: the rollout state (routing) changed; rejection: a
version failed its gates and was tagged ``rejected``; rollback: a stage went back to an earlier version."""
AUDIT_KINDS: tuple[AuditKind, ...] = ("transition", "rollout", "rejection", "rollback")


class AuditEntry(BaseModel):
    """One change of a model's registry state: who changed what, when, why, and what caused it.

    Fields that do not apply to a kind stay unset. Unknown fields are ignored, so a reader keeps working when
    a newer registry adds one.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: Name
    version: int | None = Field(
        None, ge=1, description="the version the entry is about; None for a rollout change of no one version"
    )
    kind: AuditKind
    from_stage: Stage | None = Field(None, description="the stage the version left; None: it held none")
    to_stage: Stage | None = Field(
        None, description="the stage the version moved to; None: it left every stage (a rolled-back canary)"
    )
    replaced_version: int | None = Field(
        None,
        ge=1,
        description="the version that held to_stage before: the champion replaced, or rolled back from",
    )
    actor: str = Field(min_length=1, description="registry for automatic changes, else admin:<user>")
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    reason: str
    gate_report: list[GateResult] = Field(
        default_factory=list, description="the gates evaluated, for a promotion or rejection after gating"
    )
    cause_event_id: str | None = Field(
        None, description="id of the event (or admin request) that caused it, e.g. a model.trained"
    )
    rollout: dict[str, Any] | None = Field(
        None,
        description="snapshot of the rollout state written (a RolloutState as JSON), for rollout entries",
    )

    @model_validator(mode="after")
    def _fields_of_kind(self) -> AuditEntry:
        if self.kind != "rollout" and self.version is None:
            raise ValueError(f"a {self.kind} entry names the version it is about")
        if self.kind == "transition" and self.to_stage is None:
            raise ValueError("a transition entry names the stage the version moved to (to_stage)")
        if self.kind == "rollout" and self.rollout is None:
            raise ValueError("a rollout entry carries the rollout state it wrote (rollout)")
        return self
