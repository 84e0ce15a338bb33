"""Each committed JSON Schema snapshot matches its model; every event type has a snapshot and an example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from contracts import EVENTS, KV_VALUES
from contracts.snapshot import RECORDS, SCHEMA_DIR, main, render, snapshot_models, stale

pytestmark = pytest.mark.unit

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "contracts" / "examples"


@pytest.mark.parametrize("name", list(snapshot_models()))
def test_snapshot_matches_model(name: str) -> None:
    path = SCHEMA_DIR / f"{name}.json"
    assert path.is_file(), f"no snapshot for {name}: run `python -m contracts.snapshot`"
    assert path.read_text() == render(snapshot_models()[name]), (
        f"{path.name} is stale: the model changed without its snapshot; run `python -m contracts.snapshot`, "
        "check that the change is additive (or a new .v2 type), and commit both"
    )


def test_every_event_and_kv_value_is_snapshotted() -> None:
    assert set(snapshot_models()) == set(EVENTS) | set(KV_VALUES) | set(RECORDS)
    assert list(EVENTS)[:3] == ["dataset.versioned", "dataset.rejected", "train.requested"]
    assert len(EVENTS) == 14


@pytest.mark.parametrize("event_type", list(EVENTS))
def test_every_event_has_an_example(event_type: str) -> None:
    assert (EXAMPLE_DIR / f"{event_type}.json").is_file()


def test_no_orphan_files() -> None:
    # A snapshot or example left behind by a renamed type would mislead integrators.
    assert {p.stem for p in SCHEMA_DIR.glob("*.json")} == set(snapshot_models())
    assert {p.stem for p in EXAMPLE_DIR.glob("*.json")} == set(EVENTS)


def test_snapshot_is_stable_json() -> None:
    text = render(EVENTS["dataset.versioned"])
    assert text.endswith("}\n")
    assert json.loads(text)["properties"]["dataset"]["pattern"].startswith("^[a-z0-9]")


class _Changed(BaseModel):
    dataset: str
    added_field: int = 0


def test_a_changed_model_is_reported_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dataset.versioned.json").write_text(render(EVENTS["dataset.versioned"]))
    monkeypatch.setattr(
        "contracts.snapshot.snapshot_models",
        lambda: {"dataset.versioned": _Changed, "model_policy": _Changed},
    )
    assert [p.name for p in stale(tmp_path)] == ["dataset.versioned.json", "model_policy.json"]


def test_check_command_passes_on_the_committed_snapshots(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"]) == 0
    assert "current" in capsys.readouterr().out
