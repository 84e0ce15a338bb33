"""The golden examples: each decodes into its model, re-encodes to the same envelope, and has a stable id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from contracts import EVENTS, CloudEvent, Event, InvalidEvent, decode, decode_any, encode, event_id
from contracts.names import validate_name

pytestmark = pytest.mark.unit

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "contracts" / "examples"


def load(event_type: str) -> tuple[bytes, dict[str, Any]]:
    raw = (EXAMPLE_DIR / f"{event_type}.json").read_bytes()
    return raw, json.loads(raw)


def _subset(small: Any, big: Any) -> bool:
    """Whether every value in ``small`` is in ``big`` (defaults added by the model are allowed)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(_subset, small, big))
    return bool(small == big)


@pytest.mark.parametrize("event_type", list(EVENTS))
def test_example_decodes_and_reencodes(event_type: str) -> None:
    raw, doc = load(event_type)
    model = EVENTS[event_type]
    env, event = decode(raw, model)
    assert isinstance(event, model)
    assert env.type == event_type == doc["type"]

    again_id, body = encode(event, env.source, time=env.time)
    again = CloudEvent.model_validate_json(body)
    assert again.id == again_id
    assert decode(body, model)[1] == event
    reencoded = json.loads(body)
    assert _subset(doc, reencoded), "the example differs from its re-encoding"
    assert again.id == doc["id"], "the example's id is not the one derived from its business key"
    assert again.subject == doc["subject"]


@pytest.mark.parametrize("event_type", list(EVENTS))
def test_example_subject_is_a_valid_name(event_type: str) -> None:
    raw, doc = load(event_type)
    _, event = decode(raw, EVENTS[event_type])
    assert validate_name(event.subject_name()) == doc["subject"]


@pytest.mark.parametrize("event_type", list(EVENTS))
def test_event_id_follows_the_business_key(event_type: str) -> None:
    raw, _ = load(event_type)
    model = EVENTS[event_type]
    _, event = decode(raw, model)
    key = [getattr(event, f) for f in model.key_fields]
    assert event.event_id() == event_id(event_type, *key)
    # Fields outside the key do not change the id; a changed key does.
    assert model.model_validate(event.model_dump()).event_id() == event.event_id()
    changed = _change_key(event)
    assert changed.event_id() != event.event_id()


def _change_key(event: Event) -> Event:
    field = event.key_fields[-1]
    value = getattr(event, field)
    if isinstance(value, bool) or value is None:
        raise AssertionError(f"{event.type}: key field {field} should be a value")
    if isinstance(value, int):
        new: Any = value + 1
    elif isinstance(value, str):
        new = value + "x"
    else:
        new = value.replace(microsecond=(value.microsecond + 1) % 1_000_000)
    return event.model_copy(update={field: new})


def test_every_event_declares_its_key_and_subject() -> None:
    for event_type, model in EVENTS.items():
        assert model.type == event_type
        assert model.subject_field in model.model_fields, event_type
        assert model.key_fields and set(model.key_fields) <= set(model.model_fields), event_type
        assert model.__doc__ and "Published by" in model.__doc__, event_type


def test_decode_any_uses_the_registry() -> None:
    raw, _ = load("model.trained")
    env, event = decode_any(raw)
    assert isinstance(env, CloudEvent)
    assert event is not None and event.type == "model.trained"

    unknown = json.dumps({**json.loads(raw), "type": "model.renamed"})
    env, event = decode_any(unknown)
    assert env.type == "model.renamed" and event is None


def test_invalid_messages_say_why() -> None:
    _, doc = load("dataset.versioned")
    model = EVENTS["dataset.versioned"]
    with pytest.raises(InvalidEvent, match="not JSON"):
        decode(b"{nope", model)
    with pytest.raises(InvalidEvent, match="envelope"):
        decode(json.dumps({"data": {}}), model)
    bad = {**doc, "data": {**doc["data"], "dataset": "Digits!"}}
    with pytest.raises(InvalidEvent, match="invalid name"):
        decode(json.dumps(bad), model)
    with pytest.raises(InvalidEvent, match=r"invalid dataset\.versioned data"):
        decode_any(json.dumps(bad))


def test_unknown_fields_are_ignored() -> None:
    # A consumer keeps working when a producer adds an optional field.
    _, doc = load("model.deployed")
    grown = {**doc, "data": {**doc["data"], "gpu": "H200"}}
    _, event = decode(json.dumps(grown), EVENTS["model.deployed"])
    assert "gpu" not in event.model_dump()
