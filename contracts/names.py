"""Names, subjects, streams, KV buckets and event ids: the one place that spells them (DESIGN.md).

A *name* (dataset, model) is valid as a git tag part, an MLflow model name, a Triton folder, a NATS token and
a KV key. Subjects are ``<prefix>.<event type>.<name>``; the prefix keeps installs and tests apart.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import AfterValidator, Field

__all__ = [
    "CONTROL_FAMILIES",
    "MINIO_DURABLE",
    "NAME_PATTERN",
    "SERVICES",
    "SERVICE_CONSUMES",
    "SERVICE_PUBLISHES",
    "KVBuckets",
    "ModelRef",
    "Name",
    "StreamSpec",
    "Subjects",
    "durable_name",
    "event_id",
    "inbox_prefix",
    "service_durables",
    "validate_name",
    "validate_prefix",
]

NAME_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
_NAME_RE = re.compile(rf"^{NAME_PATTERN}$")
# The prefix is a NATS token and part of stream and bucket names (which allow no dots).
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

SERVICES = ("ingest", "trainer", "registry", "serving", "monitor")

# Which event types each service publishes (the only writer of them); the NATS permissions are built from
# this, so a service cannot publish another's events. Operators publish train.requested through the CLI.
SERVICE_PUBLISHES: dict[str, tuple[str, ...]] = {
    "ingest": ("dataset.versioned", "dataset.rejected"),
    "trainer": ("model.trained", "model.training_failed"),
    "registry": ("model.promoted", "model.rejected", "model.rolled_back"),
    "serving": ("model.deployed", "model.deploy_failed", "inference.logged"),
    "monitor": ("drift.detected", "drift.cleared", "canary.verdict"),
}

# Which event types each service consumes, each through one durable consumer (``durable_name``). The NATS
# permissions are built from this too: no other service may read, ack, create or delete a service's durables.
SERVICE_CONSUMES: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "trainer": ("dataset.versioned", "train.requested", "drift.detected"),
    "registry": ("model.trained", "model.deployed", "model.deploy_failed", "canary.verdict"),
    "serving": ("model.promoted", "model.rolled_back"),
    "monitor": ("inference.logged",),
}
MINIO_DURABLE = "ingest-minio"  # ingest's consumer of MinIO's bucket notifications (not Conveyor events)
_RAW_DURABLES: dict[str, tuple[str, ...]] = {"ingest": (MINIO_DURABLE,)}

# First tokens of the control event types; every one of them lives on the control stream.
CONTROL_FAMILIES = ("dataset", "train", "model", "drift", "canary")
INFERENCE_FAMILY = "inference"

# Fixed namespace so that an event id depends only on the business key, in every process and release.
_EVENT_NAMESPACE = uuid.UUID("6f1c5d2e-8c1a-4c7e-9f3b-2a9e1d4b7c10")


def durable_name(service: str, event_type: str) -> str:
    """The durable consumer through which ``service`` consumes ``event_type``: ``<service>-<type>``, one
    NATS token (replicas share it, so they share the work)."""
    return f"{service}-{event_type.replace('.', '-')}"


def service_durables(service: str) -> tuple[str, ...]:
    """Every durable consumer ``service`` owns: one per consumed event type, and its raw ones."""
    own = (durable_name(service, event_type) for event_type in SERVICE_CONSUMES.get(service, ()))
    return (*own, *_RAW_DURABLES.get(service, ()))


def inbox_prefix(user: str | None) -> str:
    """Where the replies and deliveries of a NATS user's connections arrive: ``_INBOX_<user>``. A service's
    user may subscribe to its own only, so no service reads another's replies, nor learns the inboxes that
    a push consumer could be pointed at."""
    return f"_INBOX_{user}" if user else "_INBOX"


def validate_name(value: str) -> str:
    """Return ``value`` when it is a valid dataset or model name, else raise ``ValueError`` saying why."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"invalid name {value!r}: use 1-63 characters of lower-case letters, digits and '-', "
            "starting with a letter or digit (for example 'digits' or 'cells-v2')"
        )
    return value


def validate_prefix(value: str) -> str:
    """Return ``value`` when it can serve as a subject prefix, else raise ``ValueError``."""
    if not _PREFIX_RE.match(value):
        raise ValueError(
            f"invalid subject prefix {value!r}: use 1-32 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter"
        )
    return value


# The pattern is for the JSON Schema (integrators read it); validate_name checks, with a clearer message.
Name = Annotated[
    str, AfterValidator(validate_name), Field(json_schema_extra={"pattern": f"^{NAME_PATTERN}$"})
]
"""A pydantic field type for dataset and model names."""


def event_id(event_type: str, *key: object) -> str:
    """Derive an event id from the event type and its business key.

    The same key always gives the same id, so a publish retried after a crash is dropped by JetStream's
    duplicate window (the id travels as ``Nats-Msg-Id``).
    """
    return str(uuid.uuid5(_EVENT_NAMESPACE, "|".join([event_type, *map(str, key)])))


@dataclass(frozen=True)
class ModelRef:
    """A CLI reference ``NAME@N``; without ``@N`` it means the newest version."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, version = text.partition("@")
        validate_name(name)
        if not sep:
            return cls(name)
        if not version.isdigit() or int(version) < 1:
            raise ValueError(
                f"invalid reference {text!r}: write NAME@N with N a version number >= 1, or NAME"
            )
        return cls(name, int(version))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream Conveyor owns; ``runtime.streams`` creates or updates it."""

    name: str
    subjects: tuple[str, ...]
    description: str
    max_age_s: float = 0  # 0: unlimited
    max_bytes: int = -1
    deny_delete: bool = False
    deny_purge: bool = False
    duplicate_window_s: float = 120.0
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class KVBuckets:
    rollout: str
    policy: str
    ingest_objects: str  # the objects ingest has versioned or rejected, one entry per object
    trainer: str  # the trainer's own state per model (drift retraining, labels needed)
    monitor: str  # the monitor's per-model state: latest windows, drifting versions, judged canary steps


@dataclass(frozen=True)
class Subjects:
    """Every subject and stream of one install, derived from its prefix."""

    prefix: str = "conveyor"

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    def event(self, event_type: str, name: str) -> str:
        """The subject one event is published on: ``<prefix>.<event type>.<name>``."""
        return f"{self.prefix}.{event_type}.{validate_name(name)}"

    def event_filter(self, event_type: str, name: str = "*") -> str:
        """The subject a consumer of one event type filters on (every name by default)."""
        return f"{self.prefix}.{event_type}.{name}"

    def dlq(self, service: str) -> str:
        return f"{self.prefix}.dlq.{service}"

    def audit(self, model: str) -> str:
        return f"{self.prefix}.audit.{validate_name(model)}"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.>"

    @property
    def stream_prefix(self) -> str:
        return self.prefix.upper().replace("-", "_")

    @property
    def control_stream(self) -> str:
        return f"{self.stream_prefix}_EVENTS"

    @property
    def inference_stream(self) -> str:
        return f"{self.stream_prefix}_INFERENCE"

    @property
    def dlq_stream(self) -> str:
        return f"{self.stream_prefix}_DLQ"

    @property
    def audit_stream(self) -> str:
        return f"{self.stream_prefix}_AUDIT"

    @property
    def kv(self) -> KVBuckets:
        base = self.prefix.replace("-", "_")
        return KVBuckets(
            rollout=f"{base}_rollout",
            policy=f"{base}_policy",
            ingest_objects=f"{base}_ingest_objects",
            trainer=f"{base}_trainer",
            monitor=f"{base}_monitor",
        )

    @property
    def predictions_store(self) -> str:
        """The NATS object store of recent predictions' images (the gateway's), for feedback labels."""
        return f"{self.prefix.replace('-', '_')}_predictions"

    def stream_for(self, subject: str) -> str:
        """The stream a subject of this install is stored on."""
        family = subject.removeprefix(f"{self.prefix}.").split(".", 1)[0]
        return {
            INFERENCE_FAMILY: self.inference_stream,
            "dlq": self.dlq_stream,
            "audit": self.audit_stream,
        }.get(family, self.control_stream)

    def streams(
        self, *, inference_max_age_s: float = 7 * 24 * 3600, inference_max_bytes: int = 2 * 1024**3
    ) -> list[StreamSpec]:
        """The four streams of DESIGN.md; their subjects never overlap."""
        p = self.prefix
        return [
            StreamSpec(
                self.control_stream,
                tuple(f"{p}.{family}.>" for family in CONTROL_FAMILIES),
                "Conveyor control events (dataset, training, model lifecycle, drift, canary)",
            ),
            StreamSpec(
                self.inference_stream,
                (f"{p}.{INFERENCE_FAMILY}.>",),
                "Sampled inference logs from the gateway, bounded by size and age",
                max_age_s=inference_max_age_s,
                max_bytes=inference_max_bytes,
            ),
            StreamSpec(self.dlq_stream, (f"{p}.dlq.>",), "Dead letters with the reason, per service"),
            StreamSpec(
                self.audit_stream,
                (f"{p}.audit.>",),
                "Append-only audit log of model transitions and rollout changes",
                deny_delete=True,
                deny_purge=True,
            ),
        ]
