"""The committed AsyncAPI document is the one the code generates."""

from __future__ import annotations

import pytest
import yaml

from contracts import EVENTS
from contracts.asyncapi import DOC_PATH, main, render

pytestmark = pytest.mark.unit


def test_committed_document_is_current() -> None:
    assert DOC_PATH.is_file(), "run `python -m contracts.asyncapi` and commit docs/asyncapi.yaml"
    assert DOC_PATH.read_text() == render(), "docs/asyncapi.yaml is stale: run `python -m contracts.asyncapi`"


def test_document_describes_every_event() -> None:
    doc = yaml.safe_load(render())
    assert doc["asyncapi"] == "3.0.0"
    channels = doc["channels"]
    assert list(channels)[: len(EVENTS)] == list(EVENTS)
    for event_type, model in EVENTS.items():
        channel = channels[event_type]
        assert channel["address"] == f"conveyor.{event_type}.{{{model.subject_field}}}"
        assert "Published by" in channel["description"]
        payload = doc["components"]["schemas"][f"{model.__name__}Message"]
        assert payload["properties"]["type"]["const"] == event_type
    assert channels["rollout_state"]["address"] == "$KV.conveyor_rollout.{model}"


def test_check_passes_and_render_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    assert render() == render()
    assert main(["--check"]) == 0
    capsys.readouterr()
