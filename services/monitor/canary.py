"""Judging a canary step (pure): the canary's traffic against the champion's in the same step.

A step is one canary version at one weight; it starts when the registry wrote that rollout state
(``RolloutState.updated_at``). Once the canary served the plan's ``min_requests`` (estimated from the sampled
count and the sample rate) and ``min_seconds`` passed, ``judge`` gives a verdict from these checks:

- ``error_rate``: failed requests; may exceed the champion's by ``max_error_rate_increase``;
- ``latency_p99_ms``: at most ``max_latency_p99_ratio`` x the champion's plus ``latency_slack_ms``;
- ``disagreement``: on shadowed requests (one side mirrored to the other), the share of different labels;
- ``live_accuracy``: on feedback labels, at most ``max_accuracy_drop`` below the champion's;
- ``confidence_shift``: mean confidence at most ``max_confidence_drop`` below the champion's.

A verdict also waits for ``_MIN_CHAMPION_SAMPLES`` champion samples (when there is a champion). A check
without data on both sides (no shadowing, too few labels) passes and says so.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from contracts.events import CanaryVerdict, Feedback, GateResult, InferenceSample
from contracts.kv import ModelPolicy

__all__ = ["CanaryStep", "Side", "judge"]

_LATENCIES_KEPT = 10_000
_MIN_CHAMPION_SAMPLES = 20


@dataclass
class Side:
    """One version's traffic during the step."""

    requests: float = 0.0  # estimated: each sample counts 1 / sample rate
    samples: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCIES_KEPT))
    confidence_sum: float = 0.0
    confidences: int = 0
    feedback_total: int = 0
    feedback_correct: int = 0

    def add(self, sample: InferenceSample, rate: float) -> None:
        self.requests += 1 / rate if rate > 0 else 1.0
        self.samples += 1
        self.latencies.append(sample.latency_ms)
        if not sample.ok:
            self.errors += 1
        elif sample.confidence is not None:
            self.confidence_sum += sample.confidence
            self.confidences += 1

    @property
    def error_rate(self) -> float:
        return self.errors / self.samples if self.samples else 0.0

    @property
    def p99(self) -> float | None:
        return float(np.percentile(np.fromiter(self.latencies, float), 99)) if self.latencies else None

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self.confidences if self.confidences else None

    @property
    def accuracy(self) -> float | None:
        return self.feedback_correct / self.feedback_total if self.feedback_total else None


@dataclass
class CanaryStep:
    model: str
    canary: int
    champion: int | None
    weight: int
    started: datetime
    on_canary: Side = field(default_factory=Side)
    on_champion: Side = field(default_factory=Side)
    shadowed: int = 0
    disagreed: int = 0
    judged: bool = False

    def same_step(self, canary: int | None, weight: int, started: datetime) -> bool:
        return (self.canary, self.weight, self.started) == (canary, weight, started)

    def add(self, sample: InferenceSample, rate: float) -> None:
        if sample.time < self.started:
            return  # logged before this step began (a batch in flight across the switch)
        side = self._side(sample.version)
        if side is None:
            return
        side.add(sample, rate)
        shadow = sample.shadow
        versions = {self.canary, self.champion}
        if shadow is not None and shadow.agrees is not None and {sample.version, shadow.version} == versions:
            self.shadowed += 1
            self.disagreed += not shadow.agrees

    def add_feedback(self, feedback: Feedback) -> None:
        side = self._side(feedback.version)
        if side is not None:
            side.feedback_total += 1
            side.feedback_correct += feedback.predicted_label == feedback.true_label

    def _side(self, version: int) -> Side | None:
        if version == self.canary:
            return self.on_canary
        if version == self.champion:
            return self.on_champion
        return None


def judge(step: CanaryStep, policy: ModelPolicy, now: datetime) -> CanaryVerdict | None:
    """The step's verdict once it had the plan's minimum traffic and time; None before."""
    plan, rules = policy.rollout, policy.canary
    elapsed = (now - step.started).total_seconds()
    if step.on_canary.requests < plan.min_requests or elapsed < plan.min_seconds:
        return None
    if step.champion is not None and step.on_champion.samples < _MIN_CHAMPION_SAMPLES:
        return None  # nothing to compare with yet (the champion serves the other 1 - weight of traffic)
    canary, champion = step.on_canary, step.on_champion
    checks = [_error_rate(canary, champion, rules.max_error_rate_increase)]
    checks.append(_latency(canary, champion, rules.max_latency_p99_ratio, rules.latency_slack_ms))
    if step.shadowed:
        share = step.disagreed / step.shadowed
        checks.append(
            _check(
                "disagreement",
                share,
                rules.max_disagreement,
                share <= rules.max_disagreement,
                f"{step.disagreed} of {step.shadowed} shadowed predictions answered differently",
            )
        )
    else:
        checks.append(GateResult(name="disagreement", passed=True, detail="no shadowed requests to compare"))
    checks.append(_accuracy(canary, champion, rules.max_accuracy_drop, rules.min_feedback))
    checks.append(_confidence(canary, champion, rules.max_confidence_drop))
    failed = [c.name for c in checks if not c.passed]
    return CanaryVerdict(
        model=step.model,
        version=step.canary,
        champion_version=step.champion,
        weight=step.weight,
        verdict="fail" if failed else "pass",
        requests=round(canary.requests),
        checks=checks,
        reason=f"failed: {', '.join(failed)}" if failed else f"every check passed over {elapsed:.0f} s",
    )


def _check(name: str, value: float, threshold: float, passed: bool, detail: str | None = None) -> GateResult:
    return GateResult(
        name=name, value=round(value, 6), threshold=round(threshold, 6), passed=passed, detail=detail
    )


def _error_rate(canary: Side, champion: Side, increase: float) -> GateResult:
    limit = champion.error_rate + increase
    return _check(
        "error_rate",
        canary.error_rate,
        limit,
        canary.error_rate <= limit,
        f"{canary.errors} of {canary.samples} sampled canary predictions failed "
        f"(champion {champion.errors} of {champion.samples})",
    )


def _latency(canary: Side, champion: Side, ratio: float, slack_ms: float) -> GateResult:
    ours, theirs = canary.p99, champion.p99
    if ours is None or theirs is None or champion.samples < _MIN_CHAMPION_SAMPLES:
        return GateResult(
            name="latency_p99_ms", value=ours, passed=True, detail="too little champion traffic"
        )
    limit = theirs * ratio + slack_ms
    detail = f"p99 {ours:.2f} ms against the champion's {theirs:.2f} ms (limit {limit:.2f} ms)"
    return _check("latency_p99_ms", ours, limit, ours <= limit, detail)


def _accuracy(canary: Side, champion: Side, drop: float, minimum: int) -> GateResult:
    ours, theirs = canary.accuracy, champion.accuracy
    short = [f"{s.feedback_total} for the {n}" for n, s in (("canary", canary), ("champion", champion))]
    if ours is None or theirs is None or min(canary.feedback_total, champion.feedback_total) < minimum:
        detail = f"feedback labels: {', '.join(short)} (needs {minimum} each)"
        return GateResult(name="live_accuracy", value=ours, passed=True, detail=detail)
    limit = theirs - drop
    return _check(
        "live_accuracy",
        ours,
        limit,
        ours >= limit,
        f"{canary.feedback_correct} of {canary.feedback_total} canary answers right "
        f"(champion {champion.feedback_correct} of {champion.feedback_total})",
    )


def _confidence(canary: Side, champion: Side, drop: float) -> GateResult:
    ours, theirs = canary.mean_confidence, champion.mean_confidence
    if ours is None or theirs is None or champion.samples < _MIN_CHAMPION_SAMPLES:
        return GateResult(
            name="confidence_shift", value=ours, passed=True, detail="too little champion traffic"
        )
    shift = theirs - ours
    return _check(
        "confidence_shift",
        shift,
        drop,
        shift <= drop,
        f"mean confidence {ours:.3f} against the champion's {theirs:.3f}",
    )
