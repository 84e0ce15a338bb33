"""The AsyncAPI document of Conveyor's events, generated from the models (``docs/asyncapi.yaml``).

``python -m contracts.asyncapi`` rewrites it; ``--check`` exits 1 when the committed file is stale. The
document is built with faststream on a NatsBroker that is never connected: one publisher per event type, whose
message is the CloudEvents envelope carrying that event's ``data``, plus the KV values and dead letters.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel, create_model

from contracts.audit import AuditEntry
from contracts.deadletter import DeadLetter
from contracts.envelope import CloudEvent, Event
from contracts.events import EVENTS
from contracts.kv import ModelPolicy, RolloutState
from contracts.names import Subjects

__all__ = ["DOC_PATH", "build_broker", "envelope_model", "main", "render"]

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"
# The embedded stack's NATS; `conveyor status --json` prints the URL of a running install.
EMBEDDED_NATS = "nats://127.0.0.1:14222"
# The version of the contract as a whole: a new major with the first `.v2` event type.
API_VERSION = "1.0.0"

DESCRIPTION = """\
Conveyor turns a bucket of labelled images into a served, monitored model and retrains it on drift. Every
step is a service that reacts to these events on NATS JetStream.

Each message is a CloudEvents 1.0 structured JSON envelope whose `data` is the event. Subjects are
`<prefix>.<event type>.<name>` with the prefix `conveyor` by default and the dataset or model name last, so
`conveyor.model.promoted.digits` carries the promotions of the model `digits` and `conveyor.model.>` every
model event. Headers: `Nats-Msg-Id` is the event id, derived from the event's business key (JetStream drops a
duplicate publish), and `traceparent` carries the W3C trace context. Events grow by optional fields only;
a breaking change becomes a new type `<type>.v2` on its own subjects. Control events are stored on the stream
`CONVEYOR_EVENTS`, inference logs on `CONVEYOR_INFERENCE` (bounded by size and age).
"""


def envelope_model(event: type[Event]) -> type[BaseModel]:
    """The envelope as it travels for one event type: ``type`` fixed and ``data`` the event's model."""
    return create_model(
        f"{event.__name__}Message",
        __base__=CloudEvent,
        __doc__=f"CloudEvents envelope of a `{event.type}` event.",
        type=(Literal[event.type], event.type),  # type: ignore[arg-type]
        data=(event, ...),
    )


def _describe(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def build_broker(subjects: Subjects | None = None) -> NatsBroker:
    """A broker that is never connected, holding one documented publisher per channel."""
    subjects = subjects or Subjects()
    broker = NatsBroker(
        EMBEDDED_NATS,
        description="NATS JetStream of the embedded stack (production: your NATS cluster)",
    )
    for event_type, event in EVENTS.items():
        broker.publisher(
            subjects.event_filter(event_type, f"{{{event.subject_field}}}"),
            title=event_type,
            description=f"{_describe(event)} The last token is the {event.subject_field} name.",
            schema=envelope_model(event),
        )
    # A KV put is a message on `$KV.<bucket>.<key>`: a watcher of the bucket receives these values.
    kv_docs: list[tuple[str, str, type[BaseModel]]] = [
        ("rollout_state", subjects.kv.rollout, RolloutState),
        ("model_policy", subjects.kv.policy, ModelPolicy),
    ]
    for title, bucket, value in kv_docs:
        broker.publisher(
            f"$KV.{bucket}.{{model}}",
            title=title,
            description=f"KV bucket `{bucket}`, key: the model name. {_describe(value)}",
            schema=value,
        )
    broker.publisher(
        subjects.dlq("{service}"),
        title="dead_letter",
        description=f"Stream `{subjects.dlq_stream}`. {_describe(DeadLetter)}",
        schema=DeadLetter,
    )
    broker.publisher(
        f"{subjects.prefix}.audit.{{model}}",
        title="audit_entry",
        description=f"Stream `{subjects.audit_stream}` (no deletes, no purges). {_describe(AuditEntry)}",
        schema=AuditEntry,
    )
    return broker


def render() -> str:
    """The document as YAML; the same code always gives the same text."""
    broker = build_broker()
    spec = AsyncAPI(
        broker, title="Conveyor events", version=API_VERSION, description=DESCRIPTION, schema_version="3.0.0"
    )
    doc = spec.to_specification().to_jsonable()
    # faststream's channel order is its own; order the document as the publishers were declared, so a
    # reader meets the events in the order of the loop and a diff shows only real changes.
    order = [*EVENTS, "rollout_state", "model_policy", "dead_letter", "audit_entry"]
    for section in (doc["channels"], doc["operations"]):
        _reorder(section, lambda key: order.index(key))
    _reorder(doc["components"]["messages"], lambda key: order.index(key.split(":")[0]))
    _reorder(doc["components"]["schemas"], str)
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=110, allow_unicode=True)


def _reorder(section: dict[str, Any], key: Callable[[str], Any]) -> None:
    items = sorted(section.items(), key=lambda item: key(item[0]))
    section.clear()
    section.update(items)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings as literal blocks, so the description reads as written."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contracts.asyncapi", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed document is stale")
    args = parser.parse_args(argv)
    text = render()
    current = DOC_PATH.read_text() if DOC_PATH.is_file() else None
    if args.check:
        if current != text:
            print(f"stale: {DOC_PATH}; run `python -m contracts.asyncapi` to update it", file=sys.stderr)
            return 1
        print(f"{DOC_PATH} is current")
        return 0
    if current != text:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text)
        print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
