"""The monitor's KV state (pure, with an in-memory stand-in for the bucket)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

pytestmark = pytest.mark.unit

START = datetime(2026, 1, 1, tzinfo=UTC)


async def test_the_kv_state_keeps_the_newest_versions_and_the_drifting_ones():
    """One KV value per model must not grow with every version ever served."""
    from services.monitor.monitor import KEPT_VERSIONS, Monitor
    from services.monitor.state import ModelRecord, VersionRecord, WindowSummary

    class State:
        record = ModelRecord(model="m")

        async def update(self, model, change):
            change(self.record)
            return self.record

    monitor = Monitor(None, None, None, State(), None)  # type: ignore[arg-type]
    monitor.state.record.versions[1] = VersionRecord(drifting_since=START)
    summary = WindowSummary(closed_at=START, samples=1, outcome="too_few")
    for version in [*range(2, 30), 3]:
        record, _ = await monitor._record("m", version, summary)
    assert 3 in record.versions and 1 in record.versions  # the one just recorded, the drifting one
    assert len(record.versions) <= KEPT_VERSIONS + 1 and max(record.versions) == 29
