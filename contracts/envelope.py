"""The CloudEvents 1.0 structured-JSON envelope, the event base class and upcasting of old versions.

Every event on the bus is one JSON document::

    {"specversion": "1.0", "id": ..., "source": "conveyor/ingest", "type": "dataset.versioned",
     "time": ..., "subject": "digits", "datacontenttype": "application/json",
     "dataschema": "urn:conveyor:schema:dataset.versioned", "data": {...}}

A breaking change becomes a new type ``<type>.v2`` with an upcaster registered here, so consumers of the new
type still read messages written before it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from contracts.names import event_id

__all__ = [
    "CloudEvent",
    "EnvelopeHead",
    "Event",
    "InvalidEvent",
    "decode",
    "decode_data",
    "encode",
    "envelope",
    "parse_envelope",
    "register_upcaster",
    "schema_uri",
    "unregister_upcaster",
    "upcast",
    "upcast_chain",
]

SCHEMA_URN = "urn:conveyor:schema:"
_TIME = TypeAdapter(datetime)

E = TypeVar("E", bound="Event")
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
# old type -> (new type, function turning old data into new data)
_UPCASTERS: dict[str, tuple[str, Upcaster]] = {}


class InvalidEvent(ValueError):
    """A message that can never be handled (bad JSON, failed validation, unknown type): dead-letter it."""


def schema_uri(event_type: str) -> str:
    return f"{SCHEMA_URN}{event_type}"


class Event(BaseModel):
    """Base of every event payload (the envelope's ``data``).

    Subclasses set ``type`` (the CloudEvents type), ``subject_field`` (the field holding the dataset or model
    name that ends the subject) and ``key_fields`` (the business key the event id is derived from). Unknown
    fields are ignored, so a consumer keeps working when a producer adds an optional field.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: ClassVar[str]
    subject_field: ClassVar[str]
    key_fields: ClassVar[tuple[str, ...]]

    def subject_name(self) -> str:
        return str(getattr(self, self.subject_field))

    def event_id(self) -> str:
        return event_id(self.type, *(getattr(self, f) for f in self.key_fields))


class EnvelopeHead(BaseModel):
    """The CloudEvents 1.0 attributes of an envelope, without its data (what a consumer gets beside it)."""

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    time: datetime
    subject: str | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str | None = None


class CloudEvent(EnvelopeHead):
    """The CloudEvents 1.0 structured-mode envelope."""

    data: dict[str, Any]


@functools.cache
def _typed_envelope(expected: type[Event]) -> type[EnvelopeHead]:
    """An envelope model whose ``data`` is ``expected``: one validation pass from JSON bytes to the event."""
    model: type[EnvelopeHead] = create_model(
        f"{expected.__name__}Envelope", __base__=EnvelopeHead, data=(expected, ...)
    )
    return model


def envelope(event: Event, source: str, *, time: datetime | None = None) -> CloudEvent:
    """Wrap an event in its envelope; the id comes from the business key."""
    return CloudEvent(
        id=event.event_id(),
        source=source,
        type=event.type,
        time=time or datetime.now(UTC),
        subject=event.subject_name(),
        dataschema=schema_uri(event.type),
        data=event.model_dump(mode="json"),
    )


def encode(event: Event, source: str, *, time: datetime | None = None) -> tuple[str, bytes]:
    """The event id and the envelope's JSON bytes, ready to publish.

    Written directly rather than through ``envelope(...).model_dump_json()``: this is the hot path of every
    publish, and the data needs one serialization, not a dump, a re-validation and a second dump.
    """
    event_id = event.event_id()
    head = {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": event.type,
        "time": _TIME.dump_python(time or datetime.now(UTC), mode="json"),
        "subject": event.subject_name(),
        "datacontenttype": "application/json",
        "dataschema": schema_uri(event.type),
    }
    opening = json.dumps(head, separators=(",", ":"))[:-1].encode()
    return event_id, opening + b',"data":' + event.model_dump_json().encode() + b"}"


def register_upcaster(old_type: str, new_type: str) -> Callable[[Upcaster], Upcaster]:
    """Declare how data of ``old_type`` becomes data of ``new_type`` (a ``.v2`` after a breaking change)."""

    def register(fn: Upcaster) -> Upcaster:
        if old_type in _UPCASTERS and _UPCASTERS[old_type][0] != new_type:
            raise ValueError(f"{old_type} already upcasts to {_UPCASTERS[old_type][0]}")
        _UPCASTERS[old_type] = (new_type, fn)
        return fn

    return register


def unregister_upcaster(old_type: str) -> None:
    """Forget the upcaster from ``old_type``, if any (tests that register one clean up with it)."""
    _UPCASTERS.pop(old_type, None)


def upcast_chain(event_type: str) -> list[str]:
    """The newer types ``event_type`` upcasts to, nearest first (empty when it has no upcaster)."""
    chain: list[str] = []
    while event_type in _UPCASTERS and _UPCASTERS[event_type][0] not in chain:
        event_type = _UPCASTERS[event_type][0]
        chain.append(event_type)
    return chain


def upcast(event_type: str, data: dict[str, Any], target: str) -> dict[str, Any]:
    """Run the upcasters from ``event_type`` to ``target``; raise ``InvalidEvent`` if there is no chain."""
    seen = {event_type}
    while event_type != target:
        if event_type not in _UPCASTERS:
            raise InvalidEvent(f"event type {event_type!r} cannot be read as {target!r}: no upcaster")
        event_type, fn = _UPCASTERS[event_type]
        if event_type in seen:
            raise InvalidEvent(f"upcaster cycle through {event_type!r}")
        seen.add(event_type)
        data = fn(data)
    return data


def parse_envelope(raw: bytes | str) -> CloudEvent:
    """Parse the envelope alone, or raise ``InvalidEvent`` with the reason."""
    try:
        return CloudEvent.model_validate_json(raw)
    except ValidationError as exc:
        try:
            json.loads(raw)
        except ValueError as json_exc:
            raise InvalidEvent(f"not JSON: {json_exc}") from exc
        raise InvalidEvent(f"not a CloudEvents 1.0 envelope: {_errors(exc)}") from exc


def decode(raw: bytes | str, expected: type[E]) -> tuple[EnvelopeHead, E]:
    """Parse and validate one message as ``expected``, upcasting older types; ``InvalidEvent`` says why."""
    try:
        typed = _typed_envelope(expected).model_validate_json(raw)
    except ValidationError:
        pass  # the general path below names the problem, or upcasts an older type
    else:
        if typed.type == expected.type:
            return typed, typed.data  # type: ignore[attr-defined]
    env = parse_envelope(raw)
    return env, decode_data(env, expected)


def decode_data(env: CloudEvent, expected: type[E]) -> E:
    """Validate an envelope's data as ``expected``, upcasting older types; ``InvalidEvent`` says why not."""
    data = upcast(env.type, env.data, expected.type)
    try:
        return expected.model_validate(data)
    except ValidationError as exc:
        raise InvalidEvent(f"invalid {expected.type} data: {_errors(exc)}") from exc


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors(include_url=False)
    )
