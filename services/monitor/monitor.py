"""The monitor's use cases: feed each ``inference.logged`` batch into its windows and canary step, close
windows by size or time, and turn them into ``drift.detected`` / ``drift.cleared`` and ``canary.verdict``.

Windows and the current canary step live in memory (bounded: at most ``max_versions`` versions); what must
survive a restart or be shared by replicas lives in KV (``state.MonitorState``): each version's latest
windows and drifting flag, the model's drift cooldown, and the verdicts given. The windows open at a restart
are rebuilt from the inference stream (``replay``): the samples the last process acked that no closed window
holds.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime

from contracts.envelope import Event
from contracts.events import DriftCleared, DriftDetected, InferenceLogged
from contracts.kv import ModelPolicy, RolloutState
from services.monitor.canary import CanaryStep, judge
from services.monitor.drift import evaluate, severity
from services.monitor.metrics import MonitorMetrics
from services.monitor.profiles import ProfileError, Profiles
from services.monitor.state import ModelRecord, MonitorState, VerdictRecord, VersionRecord, WindowSummary
from services.monitor.windows import Window, WindowKey
from services.runtime.policy import Policies
from services.runtime.rollouts import Rollouts
from services.runtime.telemetry import get_logger

__all__ = ["KEPT_VERSIONS", "Monitor"]

KEPT_VERSIONS = 10
"""Versions of one model whose windows the KV state keeps (older ones leave unless drifting)."""


class Monitor:
    def __init__(
        self,
        profiles: Profiles,
        policies: Policies,
        rollouts: Rollouts,
        state: MonitorState,
        metrics: MonitorMetrics,
        *,
        embedding_sample: int = 200,
        permutations: int = 200,
        max_versions: int = 200,
        history: int = 20,
        log_to_mlflow: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.profiles, self.policies, self.rollouts, self.state = profiles, policies, rollouts, state
        self.metrics = metrics
        self.embedding_sample, self.permutations = embedding_sample, permutations
        self.max_versions, self.history, self.log_to_mlflow = max_versions, history, log_to_mlflow
        self.clock = clock
        self.windows: OrderedDict[WindowKey, Window] = OrderedDict()
        self.steps: dict[str, CanaryStep] = {}
        self._policy: dict[str, ModelPolicy] = {}
        self.log = get_logger(component="monitor")

    # ---- input -------------------------------------------------------------------------------------------

    async def on_inference_logged(
        self, event: InferenceLogged, closed: Mapping[WindowKey, datetime] | None = None
    ) -> list[Event]:
        """Feed the event's samples and feedback to their windows and the canary step. ``closed`` (a
        replay): a version's samples up to that time are in a closed window already, and its window leaves
        them out (the canary step, rebuilt from nothing, takes every one since the step began)."""
        model = event.model
        policy = self._policy[model] = await self.policies.get(model)
        step = self._step(await self.rollouts.get(model))
        out: list[Event] = []

        def in_closed_window(version: int, at: datetime) -> bool:
            until = closed.get((model, version)) if closed is not None else None
            return until is not None and at <= until

        for feedback in event.feedback:
            if step is not None:
                step.add_feedback(feedback)
            if not in_closed_window(feedback.version, feedback.time):
                self._window(model, feedback.version).add_feedback(feedback)
        for sample in event.samples:
            if step is not None:
                step.add(sample, event.sample_rate)
            if in_closed_window(sample.version, sample.time):
                continue
            window = self._window(model, sample.version)
            window.add(sample)
            if closed is None:  # a replayed sample was counted by the process that first read it
                self.metrics.samples.labels(model, str(sample.version), str(sample.ok).lower()).inc()
            if window.full(policy.drift.window_size):  # exactly window_size samples, even mid-batch
                out += await self._close(window, policy)
        out += await self._verdict(model)
        return out

    async def replay(self, events: AsyncIterator[InferenceLogged]) -> list[Event]:
        """After a restart, before any new event: the events the last process had acked, oldest first. Their
        samples that no closed window holds (by the end of each version's last window in KV) go back into
        the windows, which close by time as if they had opened when their first sample came."""
        closed = {
            (record.model, version): kept.windows[-1].end
            for record in await self.state.records()
            for version, kept in record.versions.items()
            if kept.windows and kept.windows[-1].end is not None
        }
        out: list[Event] = []
        async for event in events:
            try:
                out += await self.on_inference_logged(event, closed)
            except Exception as exc:  # what failed then fails again: it was dead-lettered, not counted
                self.log.warning("replayed batch skipped", model=event.model, error=repr(exc))
        now, wall = self.clock(), datetime.now(UTC)
        for window in self.windows.values():
            if window.start is not None:
                window.opened = min(window.opened, now - (wall - window.start).total_seconds())
        return out

    async def tick(self) -> list[Event]:
        """Close the windows past their time limit and judge the canaries that are due."""
        out: list[Event] = []
        now = self.clock()
        for (model, _), window in list(self.windows.items()):
            policy = self._policy.get(model)
            if policy is not None and window.expired(now, policy.drift.window_seconds):
                out += await self._close(window, policy)
        for model in list(self.steps):
            out += await self._verdict(model)
        return out

    def _window(self, model: str, version: int) -> Window:
        key = (model, version)
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = self._open(model, version)
            while len(self.windows) > self.max_versions:
                dropped, _ = self.windows.popitem(last=False)
                self.log.info(
                    "stopped tracking a version (max versions)", model=dropped[0], version=dropped[1]
                )
        self.windows.move_to_end(key)
        return window

    def _open(self, model: str, version: int) -> Window:
        return Window(model, version, self.clock(), self.embedding_sample)

    def _step(self, rollout: RolloutState) -> CanaryStep | None:
        """The model's current canary step (a new one when the canary or its weight changed)."""
        model = rollout.model
        if rollout.canary_version is None or rollout.canary_weight == 0:
            self.steps.pop(model, None)
            return None
        step = self.steps.get(model)
        if step is None or not step.same_step(
            rollout.canary_version, rollout.canary_weight, rollout.updated_at
        ):
            step = self.steps[model] = CanaryStep(
                model,
                rollout.canary_version,
                rollout.active_version,
                rollout.canary_weight,
                rollout.updated_at,
            )
        return step

    # ---- drift -------------------------------------------------------------------------------------------

    async def _close(self, window: Window, policy: ModelPolicy) -> list[Event]:
        """Evaluate a closed window, record it, and say what changed (drift, recovery or nothing)."""
        model, version = window.model, window.version
        self.windows[(model, version)] = self._open(model, version)
        now = datetime.now(UTC)
        summary = WindowSummary(
            start=window.start,
            end=window.end,
            closed_at=now,
            samples=window.count,
            errors=window.errors,
            outcome="too_few",
            live_accuracy=window.live_accuracy,
            feedback=window.feedback_total,
        )
        if window.live_accuracy is not None:
            self.metrics.live_accuracy.labels(model, str(version)).set(window.live_accuracy)
        if window.answered < policy.drift.min_samples:
            summary.detail = (
                f"{window.answered} answered samples, fewer than min_samples {policy.drift.min_samples}"
            )
            await self._record(model, version, summary)
            return []
        try:
            reference = await self.profiles.get(model, version)
        except ProfileError as exc:
            summary.outcome, summary.detail = "no_profile", str(exc)
            self.log.warning(
                "no reference profile: window not judged", model=model, version=version, error=str(exc)
            )
            await self._record(model, version, summary)
            return []
        tests = await asyncio.to_thread(
            evaluate, reference, window.live(), policy.drift, permutations=self.permutations
        )
        level = severity(tests)
        summary.outcome, summary.severity, summary.tests = ("drift" if level else "clear"), level, tests
        for test in tests:
            self.metrics.statistic.labels(model, str(version), test.name).set(test.statistic)
        self.metrics.drifted.labels(model, str(version)).set(1 if level else 0)
        self.log.info(
            "window closed",
            model=model,
            version=version,
            samples=window.count,
            outcome=summary.outcome,
            drifted=[t.name for t in tests if t.drifted],
        )
        record, events = await self._record(model, version, summary, policy.drift.cooldown_s)
        await self._log_to_mlflow(model, version, summary, record.versions[version].closed)
        return events

    async def _record(
        self, model: str, version: int, summary: WindowSummary, cooldown_s: float = 0.0
    ) -> tuple[ModelRecord, list[Event]]:
        """Keep the window in the model's KV state and, for a judged one, decide in the same write what to
        announce: ``drift.detected`` for a drifting window outside the model's cooldown, ``drift.cleared``
        for the first clean window after a reported drift. Deciding in the write makes replicas agree."""
        events: list[Event] = []

        def change(record: ModelRecord) -> None:
            events.clear()
            kept = record.versions.setdefault(version, VersionRecord())
            kept.windows = [*kept.windows, summary][-self.history :]
            kept.closed += 1
            # One KV value per model: keep the newest versions' windows (and any still drifting).
            others = sorted(v for v in record.versions if v != version)
            for old in others[: max(0, len(others) - (KEPT_VERSIONS - 1))]:
                if record.versions[old].drifting_since is None:
                    del record.versions[old]
            if summary.outcome in ("drift", "clear"):
                events.extend(self._announce(record, version, summary, cooldown_s))

        record = await self.state.update(model, change)
        if summary.outcome == "drift" and not events:
            self.log.info("drift within the cooldown: not announced again", model=model, version=version)
        return record, events

    @staticmethod
    def _announce(
        record: ModelRecord, version: int, summary: WindowSummary, cooldown_s: float
    ) -> list[Event]:
        assert summary.start is not None and summary.end is not None
        kept = record.versions[version]
        if summary.outcome == "drift":
            last = record.last_drift_at
            if last is not None and (summary.closed_at - last).total_seconds() < cooldown_s:
                return []
            record.last_drift_at, kept.drifting_since = summary.closed_at, summary.end
            return [
                DriftDetected(
                    model=record.model,
                    version=version,
                    window_start=summary.start,
                    window_end=summary.end,
                    sample_count=summary.samples,
                    severity=summary.severity,
                    tests=summary.tests,
                    live_accuracy=summary.live_accuracy,
                )
            ]
        if kept.drifting_since is None:
            return []
        since, kept.drifting_since = kept.drifting_since, None
        return [
            DriftCleared(
                model=record.model,
                version=version,
                window_start=summary.start,
                window_end=summary.end,
                sample_count=summary.samples,
                drifted_since=since,
                tests=summary.tests,
            )
        ]

    async def _log_to_mlflow(self, model: str, version: int, summary: WindowSummary, step: int) -> None:
        if not self.log_to_mlflow:
            return
        metrics = {f"drift.{t.name}": t.statistic for t in summary.tests}
        metrics["drift.detected"] = 1.0 if summary.outcome == "drift" else 0.0
        metrics["drift.samples"] = float(summary.samples)
        if summary.live_accuracy is not None:
            metrics["live_accuracy"] = summary.live_accuracy
        try:
            await self.profiles.log_metrics(model, version, metrics, step)
        except Exception as exc:  # MLflow away: the window is judged and kept in KV all the same
            self.log.warning(
                "window metrics not logged to MLflow", model=model, version=version, error=repr(exc)
            )

    # ---- canary ------------------------------------------------------------------------------------------

    async def _verdict(self, model: str) -> list[Event]:
        step, policy = self.steps.get(model), self._policy.get(model)
        if step is None or policy is None:
            return []
        if step.judged:
            return []
        verdict = judge(step, policy, datetime.now(UTC))
        if verdict is None:
            return []
        step.judged = True
        already: list[bool] = []

        def change(record: ModelRecord) -> None:
            already[:] = [record.judged(step.canary, step.weight, step.started)]
            if not already[0]:
                record.verdicts = [
                    *record.verdicts,
                    VerdictRecord(
                        version=step.canary,
                        weight=step.weight,
                        step_started=step.started,
                        verdict=verdict.verdict,
                        requests=verdict.requests,
                        checks=verdict.checks,
                        at=datetime.now(UTC),
                        reason=verdict.reason,
                    ),
                ][-self.history :]

        await self.state.update(model, change)
        if already[0]:
            return []  # another replica judged this step
        self.metrics.verdicts.labels(model, verdict.verdict).inc()
        self.log.info(
            "canary judged", model=model, version=step.canary, weight=step.weight, verdict=verdict.verdict
        )
        return [verdict]
