"""Each model's rollout state (``contracts.kv.RolloutState``): what a stage change does to routing, and its
NATS KV bucket, which only the registry writes and every gateway replica watches.

Routing follows the stages:

- a version promoted to ``canary`` gets the plan's first canary weight (serving loaded it when it reached
  staging); a canary passing its last step becomes champion and the active version, with no canary left;
- a version promoted to ``champion`` becomes the active version (the blue/green switch);
- ``shadow`` mirrors traffic to its version; a rejected or rolled-back version leaves every route;
- a champion rollback makes the previous champion active again.

``conveyor route`` sets a rollout by hand (``manual_route``), validated like the rest.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from contracts.kv import RolloutState, kv_key
from services.registry.stages import IllegalTransition, Tags, Transition
from services.runtime.rollouts import Rollouts

__all__ = ["RolloutStore", "after_change", "manual_route", "revised", "step_weight"]

RouteKind = Literal["blue_green", "canary", "shadow", "clear"]


def revised(state: RolloutState, actor: str, reason: str, **changes: object) -> RolloutState:
    values = state.model_dump() | changes
    values |= {
        "revision": state.revision + 1,
        "updated_at": datetime.now(UTC),
        "updated_by": actor,
        "reason": reason,
    }
    return RolloutState.model_validate(values)


def after_change(
    state: RolloutState, change: Transition, first_weight: int | None, *, actor: str, reason: str
) -> RolloutState | None:
    """The rollout state once ``change`` is written; None when routing does not change."""
    v = change.version
    updates: dict[str, object] = {}
    gone = change.kind == "rejection" or (change.kind == "rollback" and change.to_stage is None)
    if gone:
        if state.canary_version == v:
            updates |= {"canary_version": None, "canary_weight": 0}
        if state.shadow_version == v:
            updates["shadow_version"] = None
    elif change.to_stage == "champion":
        updates["active_version"] = v
        if state.canary_version == v:
            updates |= {"canary_version": None, "canary_weight": 0}
        if state.shadow_version == v:
            updates["shadow_version"] = None
    elif change.to_stage == "canary" and first_weight is not None:
        updates |= {"canary_version": v, "canary_weight": first_weight}
    elif change.to_stage == "shadow":
        updates["shadow_version"] = v
    elif change.from_stage == "canary" and state.canary_version == v:  # a canary moved back to staging
        updates |= {"canary_version": None, "canary_weight": 0}
    if all(getattr(state, k) == value for k, value in updates.items()):
        return None
    return revised(state, actor, reason, **updates)


def step_weight(weights: list[int], current: int) -> int | None:
    """The canary weight after ``current`` in the plan; None when ``current`` was the last step."""
    later = [w for w in weights if w > current]
    return later[0] if later else None


def manual_route(
    state: RolloutState,
    tags: Tags,
    kind: RouteKind,
    version: int | None,
    weight: int | None,
    *,
    actor: str,
    reason: str,
) -> RolloutState:
    """An operator's route: ``blue_green N`` (N serves everything), ``canary N`` at ``weight`` percent,
    ``shadow N``, or ``clear`` (no canary, no shadow). Raises ``IllegalTransition`` saying what is wrong."""
    if kind == "clear":
        return revised(state, actor, reason, canary_version=None, canary_weight=0, shadow_version=None)
    if version is None:
        raise IllegalTransition("bad_input", f"a {kind.replace('_', '/')} route names a version")
    if version not in tags:
        known = ", ".join(map(str, sorted(tags))) or "none"
        raise IllegalTransition(
            "unknown_version", f"version {version} is not registered (registered: {known})"
        )
    if "rejected" in tags[version]:
        raise IllegalTransition(
            "rejected_version", f"version {version} is tagged rejected and may not receive traffic"
        )
    if kind == "blue_green":
        changes: dict[str, object] = {"active_version": version}
        if state.canary_version == version:
            changes |= {"canary_version": None, "canary_weight": 0}
        if state.shadow_version == version:
            changes["shadow_version"] = None
        return revised(state, actor, reason, **changes)
    if kind == "canary":
        if weight is None or not 1 <= weight <= 100:
            raise IllegalTransition("bad_input", f"a canary route needs --weight within 1..100, got {weight}")
        if version == state.active_version:
            raise IllegalTransition(
                "bad_input", f"version {version} is the active version; it cannot also be the canary"
            )
        return revised(state, actor, reason, canary_version=version, canary_weight=weight)
    if version == state.active_version:
        raise IllegalTransition(
            "bad_input", f"version {version} is the active version; it cannot shadow itself"
        )
    return revised(state, actor, reason, shadow_version=version)


class RolloutStore(Rollouts):
    """The registry's side of the bucket: it alone writes."""

    async def put(self, state: RolloutState) -> None:
        await (await self.kv()).put(kv_key(state.model), state.model_dump_json().encode())
