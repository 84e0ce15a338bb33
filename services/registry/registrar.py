"""The registry's use cases: gate a trained version, follow deployments and canary verdicts, and the manual
promote, rollback and route, each one a serialized, audited, idempotent change of one model.

Every change follows the same steps (``_commit``):

1. read the model's audit position (``last_seq``), its MLflow aliases and tags, and its rollout state;
2. plan the change with the pure state machine (``stages``) and routing (``rollout``); nothing to do: done;
3. append the audit entry on condition that the log did not grow since step 1 (``AuditConflict``: another
   replica changed the model first, so read again and re-plan);
4. write MLflow (aliases, tags, the entry mirrored as a tag) and the rollout state in KV;
5. return the event to publish, whose ``transition`` is the entry's sequence in the audit stream.

The entry's ``Nats-Msg-Id`` follows its cause (the event or admin request id), so a redelivered event, or a
second replica handling the same one, re-appends nothing: JetStream answers with the first entry's
sequence, and the same writes and the same event id follow. A change whose writes are all done already plans
nothing; its event is then rebuilt from the audit entry of that cause and published again, which JetStream's
duplicate window drops (or, after a crash before the publish, delivers for the first time).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from contracts.audit import AuditEntry
from contracts.envelope import Event
from contracts.events import (
    CanaryVerdict,
    GateResult,
    ModelDeployed,
    ModelDeployFailed,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
    ModelTrained,
)
from contracts.kv import ModelPolicy, RolloutState, Stage
from services.registry.audit import AuditConflict, AuditLog
from services.registry.gatekeeper import Gatekeeper
from services.registry.gates import GateReport
from services.registry.rollout import (
    RolloutStore,
    RouteKind,
    after_change,
    manual_route,
    revised,
    step_weight,
)
from services.registry.stages import (
    IllegalTransition,
    Transition,
    plan_rejection,
    plan_rollback,
    plan_transition,
    stage_of,
)
from services.registry.store import ModelState, ModelStore, UnknownModel
from services.runtime.errors import TransientError
from services.runtime.policy import Policies
from services.runtime.telemetry import get_logger

__all__ = ["REGISTRY_ACTOR", "Change", "Registrar"]

REGISTRY_ACTOR = "registry"
_ATTEMPTS = 8


@dataclass
class Change:
    """What a plan asks to write: a stage change (or None for routing alone) and the rollout after it."""

    entry: AuditEntry
    transition: Transition | None = None
    rollout: RolloutState | None = None


@dataclass
class Committed:
    entry: AuditEntry
    seq: int
    rollout: RolloutState | None = None
    events: list[Event] = field(default_factory=list)


Planner = Callable[[ModelState, RolloutState, ModelPolicy], Change | None]


class Registrar:
    def __init__(
        self,
        store: ModelStore,
        audit: AuditLog,
        rollouts: RolloutStore,
        policies: Policies,
        gatekeeper: Gatekeeper,
        on_transition: Callable[[AuditEntry], None] | None = None,
    ) -> None:
        self.store, self.audit, self.rollouts = store, audit, rollouts
        self.policies, self.gatekeeper = policies, gatekeeper
        self.on_transition = on_transition or (lambda entry: None)
        self.log = get_logger(component="registrar")
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # ---- the automatic path ------------------------------------------------------------------------------

    async def on_trained(self, event: ModelTrained, cause_id: str) -> list[Event]:
        """Gate a new version: staging (or champion, for the first one) when it passes, rejected if not."""
        model, version = event.model, event.version
        state = await self._state(model)
        if version not in state.versions:
            raise TransientError(f"{model} version {version} is not in MLflow yet", retry_after=2.0)
        if _gated(state, version):
            return await self._replay(model, cause_id)  # gated before: nothing changes
        policy = await self.policies.get(model)
        report = self._recorded_report(state, version)
        if report is None:
            champion_version = state.aliases.get("champion")
            champion = state.versions.get(champion_version) if champion_version else None
            self.log.info("gating", model=model, version=version, champion=champion_version)
            report = await asyncio.to_thread(self.gatekeeper.judge, event, policy.gates, champion)
            shas = {name: ref.sha256 for name, ref in event.artifacts.items()}
            await asyncio.to_thread(
                self.store.record_gates, model, version, report.results, report.passed, shas
            )
        self.log.info("gates", model=model, version=version, passed=report.passed, summary=report.summary())

        def plan(state: ModelState, rollout: RolloutState, policy: ModelPolicy) -> Change | None:
            if _gated(state, version):
                return None  # another replica (or an earlier delivery) moved it meanwhile
            if report.passed:
                to = self._first_stage(state, policy)
                change = plan_transition(state.aliases, state.tags, version, to, policy.rollout, manual=False)
                reason = f"gates passed ({report.summary()})"
            else:
                change = plan_rejection(state.aliases, state.tags, version)
                reason = f"gates failed: {report.summary()}"
            return self._change(
                change, state, rollout, policy, REGISTRY_ACTOR, reason, cause_id, report.results
            )

        return await self._run(model, plan, cause_id)

    async def on_deployed(self, event: ModelDeployed, cause_id: str) -> list[Event]:
        """Serving loaded a version: a staging version moves on to canary (or straight to champion)."""
        if event.stage != "staging":
            return []

        def plan(state: ModelState, rollout: RolloutState, policy: ModelPolicy) -> Change | None:
            if state.aliases.get("staging") != event.version:
                return None  # moved on since, or replaced by a newer version
            to: Stage = "canary" if "canary" in policy.rollout.required_stages else "champion"
            change = plan_transition(
                state.aliases, state.tags, event.version, to, policy.rollout, manual=False
            )
            reason = (
                f"deployed in serving ({event.backend}); starting the canary"
                if to == "canary"
                else ("deployed in serving; the policy requires no canary: blue/green switch")
            )
            return self._change(change, state, rollout, policy, REGISTRY_ACTOR, reason, cause_id)

        return await self._run(event.model, plan, cause_id)

    async def on_deploy_failed(self, event: ModelDeployFailed, cause_id: str) -> list[Event]:
        """A staging or canary version that serving cannot load is rejected; the champion keeps serving."""

        def plan(state: ModelState, rollout: RolloutState, policy: ModelPolicy) -> Change | None:
            held = stage_of(state.aliases, event.version)
            if held not in ("staging", "canary"):
                if held == "champion":
                    self.log.error("the champion failed to deploy", model=event.model, reason=event.reason)
                return None
            change = plan_rejection(state.aliases, state.tags, event.version)
            reason = f"serving could not deploy it ({event.reason_code}): {event.reason}"
            return self._change(change, state, rollout, policy, REGISTRY_ACTOR, reason, cause_id)

        return await self._run(event.model, plan, cause_id)

    async def on_verdict(self, event: CanaryVerdict, cause_id: str) -> list[Event]:
        """A judged canary step: step up, promote to champion after the last step, or roll back on a fail."""
        model, version = event.model, event.version
        history = [entry for _, entry in await self.audit.history(model)]

        def plan(state: ModelState, rollout: RolloutState, policy: ModelPolicy) -> Change | None:
            current = rollout.canary_version == version and state.aliases.get("canary") == version
            if not current or rollout.canary_weight != event.weight:
                self.log.info(
                    "stale canary verdict ignored",
                    model=model,
                    version=version,
                    weight=event.weight,
                    canary=rollout.canary_version,
                    canary_weight=rollout.canary_weight,
                )
                return None
            why = f": {event.reason}" if event.reason else ""
            if event.verdict == "fail":
                change = plan_rollback(state.aliases, history, stage="canary", tags=state.tags)
                reason = f"canary failed at {event.weight}% after {event.requests} requests{why}"
                return self._change(
                    change, state, rollout, policy, REGISTRY_ACTOR, reason, cause_id, event.checks
                )
            weight = step_weight(policy.rollout.canary_weights, event.weight)
            if weight is None:
                change = plan_transition(
                    state.aliases, state.tags, version, "champion", policy.rollout, manual=False
                )
                reason = f"canary passed its last step ({event.weight}%, {event.requests} requests){why}"
                return self._change(
                    change, state, rollout, policy, REGISTRY_ACTOR, reason, cause_id, event.checks
                )
            reason = f"canary passed {event.weight}% ({event.requests} requests): stepping up to {weight}%"
            stepped = revised(rollout, REGISTRY_ACTOR, reason, canary_weight=weight)
            return Change(
                self._rollout_entry(stepped, version, REGISTRY_ACTOR, reason, cause_id), None, stepped
            )

        return await self._run(model, plan, cause_id)

    # ---- manual control ----------------------------------------------------------------------------------

    async def promote(
        self, model: str, version: int, to: Stage, *, reason: str, actor: str, request_id: str
    ) -> Committed | None:
        """An operator's promotion; None when the version already holds the stage."""

        def plan(state: ModelState, rollout: RolloutState, policy: ModelPolicy) -> Change | None:
            change = plan_transition(state.aliases, state.tags, version, to, policy.rollout, manual=True)
            return self._change(change, state, rollout, policy, actor, reason, request_id)

        return await self._commit(model, plan)

    async def rollback(
        self, model: str, *, stage: Stage = "champion", reason: str, actor: str, request_id: str
    ) -> Committed | None:
        history = [entry for _, entry in await self.audit.history(model)]
        if stage not in ("champion", "canary"):
            raise IllegalTransition("bad_input", f"cannot roll back stage {stage!r}: use champion or canary")

        def plan(state: ModelState, rollout: RolloutState, policy: ModelPolicy) -> Change | None:
            change = plan_rollback(state.aliases, history, stage=stage, tags=state.tags)
            return self._change(change, state, rollout, policy, actor, reason, request_id)

        return await self._commit(model, plan)

    async def route(
        self,
        model: str,
        kind: RouteKind,
        version: int | None,
        weight: int | None,
        *,
        reason: str,
        actor: str,
        request_id: str,
    ) -> Committed | None:
        def plan(state: ModelState, rollout: RolloutState, policy: ModelPolicy) -> Change | None:
            routed = manual_route(rollout, state.tags, kind, version, weight, actor=actor, reason=reason)
            if _routes(routed) == _routes(rollout):
                return None
            return Change(self._rollout_entry(routed, version, actor, reason, request_id), None, routed)

        return await self._commit(model, plan)

    # ---- reading -----------------------------------------------------------------------------------------

    async def describe(self, model: str) -> dict[str, Any]:
        state = await self._state(model)
        rollout = await self.rollouts.get(model)
        versions = []
        for v, info in sorted(state.versions.items()):
            metrics = await asyncio.to_thread(self.store.run_metrics, info)
            versions.append(
                {
                    "version": v,
                    "aliases": sorted(s for s, held in state.aliases.items() if held == v),
                    "tags": sorted(info.state_tags),
                    "dataset": info.tags.get("dataset"),
                    "gates_passed": {"true": True, "false": False}.get(
                        info.tags.get("conveyor.gates_passed", "")
                    ),
                    "test_accuracy": metrics.test_accuracy if metrics else None,
                    "test_macro_f1": metrics.test_macro_f1 if metrics else None,
                    "created_at": info.created_at.isoformat(),
                }
            )
        return {
            "model": model,
            "aliases": dict(sorted(state.aliases.items())),
            "rollout": rollout.model_dump(mode="json"),
            "versions": versions,
        }

    async def models(self) -> list[str]:
        return await asyncio.to_thread(self.store.models)

    # ---- the commit protocol -----------------------------------------------------------------------------

    async def _run(self, model: str, plan: Planner, cause_id: str) -> list[Event]:
        committed = await self._commit(model, plan)
        if committed is None:
            return await self._replay(model, cause_id)
        return committed.events

    async def _commit(self, model: str, plan: Planner) -> Committed | None:
        async with self._locks[model]:
            for _ in range(_ATTEMPTS):
                last = await self.audit.last_seq(model)
                state = await self._state(model)
                rollout = await self.rollouts.get(model)
                policy = await self.policies.get(model)
                change = plan(state, rollout, policy)
                if change is None:
                    return None
                try:
                    seq = await self.audit.append(change.entry, expected_last_seq=last)
                except AuditConflict:
                    self.log.info("audit log moved on: planning again", model=model)
                    continue
                if change.transition is not None:
                    await asyncio.to_thread(self.store.apply, model, change.transition, change.entry, seq)
                elif change.entry.version is not None:
                    await asyncio.to_thread(self.store.mirror, change.entry, seq)
                if change.rollout is not None:
                    await self.rollouts.put(change.rollout)
                self.on_transition(change.entry)
                self.log.info(
                    "changed",
                    model=model,
                    kind=change.entry.kind,
                    version=change.entry.version,
                    from_stage=change.entry.from_stage,
                    to_stage=change.entry.to_stage,
                    seq=seq,
                    actor=change.entry.actor,
                )
                events = await self._events(change.entry, seq, policy, state)
                return Committed(change.entry, seq, change.rollout, events)
        raise TransientError(f"the audit log of {model} kept changing; trying again later")

    async def _replay(self, model: str, cause_id: str) -> list[Event]:
        """The events of the changes this cause already made (published again; JetStream drops repeats)."""
        entries = [
            (s, e) for s, e in await self.audit.history(model, limit=200) if e.cause_event_id == cause_id
        ]
        if not entries:
            return []
        policy, state = await self.policies.get(model), await self._state(model)
        events = []
        for seq, entry in entries:
            events += await self._events(entry, seq, policy, state)
        return events

    async def _events(
        self, entry: AuditEntry, seq: int, policy: ModelPolicy, state: ModelState
    ) -> list[Event]:
        """The event of a committed entry; ``state`` is the model as read for it (its versions' runs and
        tags do not change with the entry's writes)."""
        assert entry.version is not None or entry.kind == "rollout"
        if entry.kind == "transition" and entry.to_stage is not None and entry.version is not None:
            info = state.versions.get(entry.version)
            artifacts = await asyncio.to_thread(self.store.artifacts, entry.model, info) if info else {}
            return [
                ModelPromoted(
                    model=entry.model,
                    version=entry.version,
                    from_stage=entry.from_stage,
                    to_stage=entry.to_stage,
                    transition=seq,
                    reason=entry.reason,
                    actor=entry.actor,
                    gate_report=entry.gate_report,
                    artifacts=artifacts,
                    rollout_plan=policy.rollout.plan(),
                )
            ]
        if entry.kind == "rejection" and entry.version is not None:
            return [
                ModelRejected(
                    model=entry.model,
                    version=entry.version,
                    reason=entry.reason,
                    gate_report=entry.gate_report,
                )
            ]
        if entry.kind == "rollback" and entry.version is not None:
            canary = entry.to_stage is None
            return [
                ModelRolledBack(
                    model=entry.model,
                    stage="canary" if canary else "champion",
                    from_version=entry.version if canary else (entry.replaced_version or entry.version),
                    to_version=entry.replaced_version if canary else entry.version,
                    transition=seq,
                    reason=entry.reason,
                    actor=entry.actor,
                    cause_id=entry.cause_event_id,
                )
            ]
        return []  # a routing change: the gateway follows the KV bucket

    # ---- helpers -----------------------------------------------------------------------------------------

    async def _state(self, model: str) -> ModelState:
        try:
            return await asyncio.to_thread(self.store.state, model)
        except UnknownModel as exc:
            raise IllegalTransition(
                "unknown_model", f"no model named {model!r} is registered (`conveyor models` lists them)"
            ) from exc

    def _change(
        self,
        change: Transition,
        state: ModelState,
        rollout: RolloutState,
        policy: ModelPolicy,
        actor: str,
        reason: str,
        cause_id: str,
        gate_report: list[GateResult] | None = None,
    ) -> Change | None:
        if change.is_noop:
            return None
        weights = policy.rollout.canary_weights
        routed = after_change(rollout, change, weights[0] if weights else None, actor=actor, reason=reason)
        if gate_report is None and change.to_stage is not None:
            gate_report = state.versions[change.version].gate_report
        if change.kind == "rollback" and change.to_stage is None:
            # a canary rollback: the entry names the champion that keeps serving
            change = Transition(
                change.kind,
                change.version,
                change.from_stage,
                None,
                replaced=state.aliases.get("champion"),
                remove_aliases=change.remove_aliases,
                add_tags=change.add_tags,
            )
        entry = change.entry(
            state.model,
            actor=actor,
            reason=reason,
            gate_report=gate_report or [],
            cause_event_id=cause_id,
        )
        if routed is not None:
            entry = entry.model_copy(update={"rollout": routed.model_dump(mode="json")})
        return Change(entry, change, routed)

    @staticmethod
    def _rollout_entry(
        routed: RolloutState, version: int | None, actor: str, reason: str, cause_id: str
    ) -> AuditEntry:
        return AuditEntry(
            model=routed.model,
            version=version,
            kind="rollout",
            actor=actor,
            reason=reason,
            cause_event_id=cause_id,
            rollout=routed.model_dump(mode="json"),
        )

    @staticmethod
    def _first_stage(state: ModelState, policy: ModelPolicy) -> Stage:
        """Staging, where serving loads it before it takes traffic; champion at once for the first version
        of a model when the policy allows (nothing is served yet)."""
        if "champion" not in state.aliases and policy.rollout.first_to_champion:
            return "champion"
        return "staging"

    @staticmethod
    def _recorded_report(state: ModelState, version: int) -> GateReport | None:
        info = state.versions[version]
        if "conveyor.gates_passed" not in info.tags:
            return None
        return GateReport(info.tags["conveyor.gates_passed"] == "true", info.gate_report)


def _gated(state: ModelState, version: int) -> bool:
    """The version left ``candidate``: it was promoted or rejected after its gates."""
    return "rejected" in state.tags[version] or stage_of(state.aliases, version) not in (None, "candidate")


def _routes(state: RolloutState) -> tuple[Any, ...]:
    return (state.active_version, state.canary_version, state.canary_weight, state.shadow_version)
