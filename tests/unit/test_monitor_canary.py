"""Canary judging (pure): no verdict before the plan's minimum traffic and some champion traffic, then each
check against the champion's traffic in the same step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from contracts.events import Feedback, InferenceSample, ShadowResult
from contracts.kv import ModelPolicy, RolloutPolicy
from services.monitor.canary import CanaryStep, judge

pytestmark = pytest.mark.unit

START = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = ModelPolicy(
    model="m", rollout=RolloutPolicy(canary_weights=[10, 50], min_requests=100, min_seconds=60)
)


def sample(version: int, *, ok: bool = True, latency: float = 2.0, confidence: float = 0.9, shadow=None):
    return InferenceSample(
        prediction_id="p",
        time=START + timedelta(seconds=1),
        version=version,
        route="canary" if version == 2 else "active",
        latency_ms=latency,
        ok=ok,
        label="1" if ok else None,
        confidence=confidence if ok else None,
        shadow=shadow,
    )


def step(**canary) -> CanaryStep:
    s = CanaryStep("m", canary=2, champion=1, weight=10, started=START)
    for _ in range(100):
        s.add(sample(2, **canary), rate=1.0)
    for _ in range(50):
        s.add(sample(1), rate=1.0)
    return s


def test_no_verdict_before_the_minimum_traffic_time_and_champion_samples():
    later = START + timedelta(seconds=61)
    assert judge(step(), POLICY, START + timedelta(seconds=30)) is None  # too early
    few = CanaryStep("m", canary=2, champion=1, weight=10, started=START)
    for _ in range(99):
        few.add(sample(2), rate=1.0)
    assert judge(few, POLICY, later) is None  # 99 < min_requests
    few.add(sample(2), rate=1.0)
    assert judge(few, POLICY, later) is None  # no champion traffic to compare with
    sampled = CanaryStep("m", canary=2, champion=1, weight=10, started=START)
    for _ in range(10):
        sampled.add(sample(2), rate=0.1)  # 10 samples at a 10 % rate stand for 100 requests
    for _ in range(20):
        sampled.add(sample(1), rate=0.1)
    assert judge(sampled, POLICY, later).requests == 100
    old = CanaryStep("m", canary=2, champion=1, weight=10, started=START + timedelta(seconds=5))
    old.add(sample(2), rate=1.0)  # logged before this step began
    assert old.on_canary.samples == 0


def test_a_canary_like_its_champion_passes():
    verdict = judge(step(), POLICY, START + timedelta(seconds=61))
    assert verdict.verdict == "pass" and verdict.weight == 10 and verdict.champion_version == 1
    assert {c.name for c in verdict.checks} == {
        "error_rate",
        "latency_p99_ms",
        "disagreement",
        "live_accuracy",
        "confidence_shift",
    }


@pytest.mark.parametrize(
    ("canary", "failing"),
    [
        ({"ok": False}, "error_rate"),
        ({"latency": 50.0}, "latency_p99_ms"),
        ({"confidence": 0.5}, "confidence_shift"),
        ({"shadow": ShadowResult(version=1, label="2", agrees=False)}, "disagreement"),
    ],
)
def test_each_check_fails_a_worse_canary(canary, failing):
    verdict = judge(step(**canary), POLICY, START + timedelta(seconds=61))
    assert verdict.verdict == "fail" and failing in verdict.reason
    assert [c.name for c in verdict.checks if not c.passed] == [failing]


def test_live_accuracy_compares_feedback_labels_once_both_sides_have_enough():
    s = step()
    for version, right in ((2, 12), (1, 30)):
        for i in range(30):
            s.add_feedback(
                Feedback(
                    prediction_id=str(i),
                    time=START,
                    version=version,
                    predicted_label="1",
                    true_label="1" if i < right else "7",
                )
            )
    verdict = judge(s, POLICY, START + timedelta(seconds=61))
    [check] = [c for c in verdict.checks if c.name == "live_accuracy"]
    assert not check.passed and check.value == pytest.approx(0.4) and check.threshold == pytest.approx(0.95)
