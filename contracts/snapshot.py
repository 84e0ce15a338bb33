"""JSON Schema snapshots of every event and KV value, committed under ``contracts/schemas/``.

A contract test compares them with the models, so a model cannot change without its snapshot changing in the
same commit (and a reviewer seeing it). ``python -m contracts.snapshot`` rewrites them; ``--check`` lists the
stale ones and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from contracts.audit import AuditEntry
from contracts.deadletter import DeadLetter
from contracts.events import EVENTS
from contracts.kv import KV_VALUES

# Records on the bus that are not events: dead letters and the audit log.
RECORDS: dict[str, type[BaseModel]] = {"dead_letter": DeadLetter, "audit_entry": AuditEntry}

__all__ = ["SCHEMA_DIR", "main", "render", "snapshot_models", "stale", "write"]

SCHEMA_DIR = Path(__file__).parent / "schemas"


def snapshot_models() -> dict[str, type[BaseModel]]:
    """Snapshot name (the file name without ``.json``) -> model: each event type, then each KV value."""
    return {**EVENTS, **KV_VALUES, **RECORDS}


def render(model: type[BaseModel]) -> str:
    """The snapshot text of one model: its JSON Schema, stable across runs."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def stale(directory: Path = SCHEMA_DIR) -> list[Path]:
    """The snapshot files that are missing or differ from their model."""
    out = []
    for name, model in snapshot_models().items():
        path = directory / f"{name}.json"
        if not path.is_file() or path.read_text() != render(model):
            out.append(path)
    return out


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Rewrite the stale snapshots; return them."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = stale(directory)
    models = snapshot_models()
    for path in changed:
        path.write_text(render(models[path.name.removesuffix(".json")]))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contracts.snapshot", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when a snapshot is stale; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        outdated = stale()
        for path in outdated:
            print(f"stale: {path}", file=sys.stderr)
        if outdated:
            print("run `python -m contracts.snapshot` to update them, and commit the result", file=sys.stderr)
            return 1
        print(f"{len(snapshot_models())} schema snapshots are current")
        return 0
    for path in write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
