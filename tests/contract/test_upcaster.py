"""A breaking change becomes a ``.v2`` type with an upcaster, so old messages are still read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import Field

from contracts import Event, InvalidEvent, decode, register_upcaster, unregister_upcaster
from contracts.envelope import upcast_chain
from contracts.events import DatasetVersioned
from contracts.names import Name

pytestmark = pytest.mark.unit

OLD_MESSAGE = (Path(__file__).resolve().parents[2] / "contracts/examples/dataset.versioned.json").read_bytes()


class DatasetVersionedV2(Event):
    """A breaking change for the test: ``git_rev`` renamed, ``dvc_md5`` moved into a nested field."""

    type: ClassVar[str] = "dataset.versioned.v2"
    subject_field: ClassVar[str] = "dataset"
    key_fields: ClassVar[tuple[str, ...]] = ("dataset", "version")

    dataset: Name
    version: int = Field(ge=1)
    commit: str
    content: dict[str, str]


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["commit"] = data.pop("git_rev")
    data["content"] = {"dvc_md5": data.pop("dvc_md5")}
    return data


@pytest.fixture
def v2_upcaster() -> Iterator[None]:
    """Registers dataset.versioned -> dataset.versioned.v2 for one test only."""
    register_upcaster(DatasetVersioned.type, DatasetVersionedV2.type)(_v1_to_v2)
    yield
    unregister_upcaster(DatasetVersioned.type)


def test_old_message_is_read_as_v2(v2_upcaster: None) -> None:
    env, event = decode(OLD_MESSAGE, DatasetVersionedV2)
    old = json.loads(OLD_MESSAGE)["data"]
    assert env.type == "dataset.versioned"
    assert event.commit == old["git_rev"]
    assert event.content == {"dvc_md5": old["dvc_md5"]}
    assert (event.dataset, event.version) == ("digits", 1)


def test_v2_message_is_read_directly(v2_upcaster: None) -> None:
    data = {"dataset": "digits", "version": 2, "commit": "abc", "content": {"dvc_md5": "x.dir"}}
    env = {
        "id": "1",
        "source": "test",
        "type": "dataset.versioned.v2",
        "time": "2025-01-01T00:00:00Z",
        "data": data,
    }
    assert decode(json.dumps(env), DatasetVersionedV2)[1].commit == "abc"


def test_the_registration_does_not_leak() -> None:
    # Runs after the tests above in file order: their fixture removed the upcaster again.
    assert upcast_chain(DatasetVersioned.type) == []
    with pytest.raises(InvalidEvent, match="no upcaster"):
        decode(OLD_MESSAGE, DatasetVersionedV2)


def test_unknown_type_without_upcaster_is_invalid() -> None:
    doc = json.loads(OLD_MESSAGE)
    doc["type"] = "dataset.renamed"
    with pytest.raises(InvalidEvent, match=r"'dataset.renamed' cannot be read as 'dataset.versioned'"):
        decode(json.dumps(doc), DatasetVersioned)


def test_conflicting_upcaster_is_refused(v2_upcaster: None) -> None:
    with pytest.raises(ValueError, match="already upcasts"):
        register_upcaster(DatasetVersioned.type, "dataset.versioned.v3")(_v1_to_v2)
