"""Names, references, subjects and streams (DESIGN.md "Names, subjects and ownership")."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from contracts.names import (
    SERVICE_PUBLISHES,
    ModelRef,
    Name,
    Subjects,
    event_id,
    validate_name,
    validate_prefix,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["digits", "cells-v2", "0", "a" * 63, "9-lives", "x-"])
def test_name_rule_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Digits", "-digits", "a" * 64, "cells_v2", "cells.v2", "a b", "dígits", "a/b", "a*", "a>"]
)
def test_name_rule_refuses(name: str) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        validate_name(name)


def test_name_field_type_explains_the_rule() -> None:
    class M(BaseModel):
        model: Name

    with pytest.raises(ValidationError, match="lower-case letters"):
        M(model="Bad Name")
    assert M.model_json_schema()["properties"]["model"]["pattern"] == "^[a-z0-9][a-z0-9-]{0,62}$"


@pytest.mark.parametrize(
    ("text", "ref"),
    [("digits", ModelRef("digits")), ("digits@3", ModelRef("digits", 3)), ("a-b@12", ModelRef("a-b", 12))],
)
def test_model_ref_parse(text: str, ref: ModelRef) -> None:
    assert ModelRef.parse(text) == ref
    assert str(ref) == text


@pytest.mark.parametrize(
    "text", ["digits@", "digits@0", "digits@-1", "digits@v3", "digits@1.5", "Digits@1", "@3"]
)
def test_model_ref_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        ModelRef.parse(text)


def test_subjects() -> None:
    s = Subjects()
    assert s.event("dataset.versioned", "digits") == "conveyor.dataset.versioned.digits"
    assert s.event_filter("model.promoted") == "conveyor.model.promoted.*"
    assert s.dlq("trainer") == "conveyor.dlq.trainer"
    assert s.audit("digits") == "conveyor.audit.digits"
    assert s.all_events == "conveyor.>"
    assert Subjects("t-1a").event("model.trained", "x") == "t-1a.model.trained.x"
    with pytest.raises(ValueError):
        s.event("model.trained", "not.a.token")


@pytest.mark.parametrize("prefix", ["", "Conveyor", "a.b", "1abc", "a" * 33, "a b"])
def test_prefix_rule_refuses(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid subject prefix"):
        validate_prefix(prefix)
    with pytest.raises(ValueError):
        Subjects(prefix)


def test_stream_and_bucket_names() -> None:
    s = Subjects("test-7")
    assert [spec.name for spec in s.streams()] == [
        "TEST_7_EVENTS",
        "TEST_7_INFERENCE",
        "TEST_7_DLQ",
        "TEST_7_AUDIT",
    ]
    assert (s.kv.rollout, s.kv.policy) == ("test_7_rollout", "test_7_policy")
    audit = next(spec for spec in s.streams() if spec.name == s.audit_stream)
    assert audit.deny_delete and audit.deny_purge
    inference = next(spec for spec in s.streams() if spec.name == s.inference_stream)
    assert inference.max_age_s > 0 and inference.max_bytes > 0


def _matches(pattern: str, subject: str) -> bool:
    p, t = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or token not in ("*", t[i]):
            return False
    return len(p) == len(t)


def test_streams_do_not_overlap_and_cover_every_event() -> None:
    s = Subjects()
    specs = s.streams()
    samples = [s.event(t, "digits") for types in SERVICE_PUBLISHES.values() for t in types]
    samples += [s.event("train.requested", "digits"), s.dlq("ingest"), s.audit("digits")]
    for subject in samples:
        owners = [spec.name for spec in specs if any(_matches(p, subject) for p in spec.subjects)]
        assert owners == [s.stream_for(subject)], subject
    # Filters of different streams never share a subject: their first two tokens differ.
    heads = [tuple(p.split(".")[:2]) for spec in specs for p in spec.subjects]
    assert len(heads) == len(set(heads))


def test_inference_goes_to_its_own_stream() -> None:
    s = Subjects()
    assert s.stream_for(s.event("inference.logged", "digits")) == s.inference_stream
    assert s.stream_for(s.event("model.trained", "digits")) == s.control_stream


def test_event_id_is_deterministic() -> None:
    a = event_id("dataset.versioned", "digits", 3)
    assert a == event_id("dataset.versioned", "digits", 3)
    assert a != event_id("dataset.versioned", "digits", 4)
    assert a != event_id("dataset.rejected", "digits", 3)
