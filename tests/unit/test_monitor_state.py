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


async def test_a_replay_refills_only_what_no_closed_window_holds_and_keeps_the_windows_age():
    """After a restart: a version's samples up to the end of its last closed window are skipped, the rest
    (and every sample of a version with no closed window) go back in; a rebuilt window closes by time as
    if it had opened when its first sample came, not at the restart."""
    from datetime import timedelta

    from contracts.events import InferenceLogged, InferenceSample
    from contracts.kv import ModelPolicy, RolloutState
    from services.monitor.monitor import Monitor
    from services.monitor.state import ModelRecord, VersionRecord, WindowSummary

    now = datetime.now(UTC)
    closed_end = now - timedelta(seconds=100)

    class State:
        async def records(self):
            summary = WindowSummary(end=closed_end, closed_at=closed_end, samples=10, outcome="clear")
            return [ModelRecord(model="m", versions={1: VersionRecord(windows=[summary], closed=1)})]

    class Policies:
        async def get(self, model):
            return ModelPolicy(model=model)

    class Rollouts:
        async def get(self, model):
            return RolloutState(model=model, active_version=1)

    def sample(version: int, ago_s: float) -> InferenceSample:
        at = now - timedelta(seconds=ago_s)
        return InferenceSample(prediction_id="p", time=at, version=version, route="active", latency_ms=1.0)

    async def events():
        yield InferenceLogged(
            model="m", batch_id="b1", sample_rate=1.0, samples=[sample(1, 120), sample(1, 100)]
        )
        yield InferenceLogged(
            model="m", batch_id="b2", sample_rate=1.0, samples=[sample(1, 90), sample(2, 200)]
        )

    clock = [1000.0]
    monitor = Monitor(None, Policies(), Rollouts(), State(), None, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert await monitor.replay(events()) == []
    assert {key: w.count for key, w in monitor.windows.items()} == {("m", 1): 1, ("m", 2): 1}
    seconds = ModelPolicy(model="m").drift.window_seconds  # 300
    assert not monitor.windows[("m", 2)].expired(1000.0, seconds)
    assert monitor.windows[("m", 2)].expired(1000.0 + seconds - 199, seconds)  # its sample is 200 s old
    assert not monitor.windows[("m", 1)].expired(1000.0 + seconds - 91, seconds)
