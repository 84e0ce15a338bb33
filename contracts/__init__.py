"""Conveyor's contracts: the events, their CloudEvents envelope, the KV values, names and subjects.

Every service and integrator speaks through these and nothing else. Errors::

    ValueError
     └── InvalidEvent   bad JSON, not a CloudEvents envelope, failed validation, no upcaster: dead-letter it
"""

from __future__ import annotations

from contracts.audit import AuditEntry
from contracts.deadletter import DeadLetter
from contracts.envelope import (
    CloudEvent,
    Event,
    InvalidEvent,
    decode,
    decode_data,
    encode,
    parse_envelope,
    register_upcaster,
    unregister_upcaster,
    upcast_chain,
)
from contracts.events import (
    EVENTS,
    CanaryVerdict,
    DatasetRejected,
    DatasetVersioned,
    DriftDetected,
    InferenceLogged,
    ModelDeployed,
    ModelDeployFailed,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
    ModelTrained,
    ModelTrainingFailed,
    TrainRequested,
)
from contracts.kv import KV_VALUES, ModelPolicy, RolloutPlan, RolloutState, Stage, kv_key
from contracts.names import ModelRef, Name, Subjects, event_id, validate_name

__all__ = [
    "EVENTS",
    "KV_VALUES",
    "AuditEntry",
    "CanaryVerdict",
    "CloudEvent",
    "DatasetRejected",
    "DatasetVersioned",
    "DeadLetter",
    "DriftDetected",
    "Event",
    "InferenceLogged",
    "InvalidEvent",
    "ModelDeployFailed",
    "ModelDeployed",
    "ModelPolicy",
    "ModelPromoted",
    "ModelRef",
    "ModelRejected",
    "ModelRolledBack",
    "ModelTrained",
    "ModelTrainingFailed",
    "Name",
    "RolloutPlan",
    "RolloutState",
    "Stage",
    "Subjects",
    "TrainRequested",
    "decode",
    "decode_any",
    "encode",
    "event_id",
    "kv_key",
    "register_upcaster",
    "unregister_upcaster",
    "validate_name",
]


def decode_any(raw: bytes | str) -> tuple[CloudEvent, Event | None]:
    """Decode a message of any known type (tools that show every event, dead-letter replay).

    An old type is read as the first known type its upcasters lead to. The event is ``None`` when the type is
    unknown; ``InvalidEvent`` is raised when the message is not an envelope or its data is invalid.
    """
    env = parse_envelope(raw)
    for event_type in (env.type, *upcast_chain(env.type)):
        if event_type in EVENTS:
            return env, decode_data(env, EVENTS[event_type])
    return env, None
