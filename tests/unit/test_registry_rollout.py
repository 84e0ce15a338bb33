"""The rollout state after each stage change, the canary's steps, and operators' manual routes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from contracts.audit import AuditEntry
from contracts.kv import RolloutPolicy, RolloutState, Stage
from services.registry.rollout import after_change, manual_route, revised, step_weight
from services.registry.stages import (
    Aliases,
    IllegalTransition,
    Transition,
    plan_rejection,
    plan_rollback,
    plan_transition,
)

pytestmark = pytest.mark.unit

POLICY = RolloutPolicy()  # canary weights [10, 50], staging and canary required
FIRST_WEIGHT = POLICY.canary_weights[0]
ACTOR = "admin:alice"


def tags_of(*versions: int, **extra: set[str]) -> dict[int, set[str]]:
    """Every version registered and untagged, plus ``v3={"rejected"}``-style extras."""
    tags: dict[int, set[str]] = {v: set() for v in versions}
    for key, value in extra.items():
        tags[int(key.removeprefix("v"))] = set(value)
    return tags


def state(**fields: Any) -> RolloutState:
    return RolloutState(model="digits", **fields)


def promotion(aliases: Aliases, tags: dict[int, set[str]], version: int, to: Stage) -> Transition:
    return plan_transition(aliases, tags, version, to, POLICY, manual=True)


def after(
    rollout: RolloutState, change: Transition, first_weight: int | None = FIRST_WEIGHT, reason: str = "test"
) -> RolloutState | None:
    return after_change(rollout, change, first_weight, actor=ACTOR, reason=reason)


def written(
    rollout: RolloutState, change: Transition, first_weight: int | None = FIRST_WEIGHT, reason: str = "test"
) -> RolloutState:
    new = after(rollout, change, first_weight, reason)
    assert new is not None, f"{change} should change the routing of {rollout}"
    assert new.revision == rollout.revision + 1
    assert new.updated_by == ACTOR
    assert new.reason == reason
    assert new.model == rollout.model
    return new


def routes(rollout: RolloutState) -> tuple[int | None, int | None, int, int | None]:
    return rollout.active_version, rollout.canary_version, rollout.canary_weight, rollout.shadow_version


# ---- after_change: promotions ------------------------------------------------------------------------


def test_promotion_to_canary_routes_the_first_weight_to_it() -> None:
    aliases: Aliases = {"champion": 1, "staging": 2}
    change = promotion(aliases, tags_of(1, 2), 2, "canary")
    new = written(state(active_version=1, revision=4), change, reason="staging looked fine")
    assert routes(new) == (1, 2, 10, None)
    assert new.revision == 5


def test_promotion_to_canary_uses_the_weight_it_is_given() -> None:
    change = promotion({"champion": 1, "staging": 2}, tags_of(1, 2), 2, "canary")
    assert routes(written(state(active_version=1), change, first_weight=25)) == (1, 2, 25, None)


def test_a_new_canary_replaces_the_previous_one_and_restarts_at_the_first_weight() -> None:
    aliases: Aliases = {"champion": 1, "canary": 2, "staging": 3}
    change = promotion(aliases, tags_of(1, 2, 3), 3, "canary")
    assert change.replaced == 2
    new = written(state(active_version=1, canary_version=2, canary_weight=50), change)
    assert routes(new) == (1, 3, 10, None)


def test_promotion_to_canary_without_a_plan_changes_no_route() -> None:
    change = promotion({"champion": 1, "staging": 2}, tags_of(1, 2), 2, "canary")
    assert after(state(active_version=1), change, first_weight=None) is None


def test_promotion_to_champion_makes_the_version_active_and_ends_its_canary() -> None:
    aliases: Aliases = {"champion": 1, "canary": 2}
    change = promotion(aliases, tags_of(1, 2), 2, "champion")
    new = written(state(active_version=1, canary_version=2, canary_weight=50, revision=7), change)
    assert routes(new) == (2, None, 0, None)
    assert new.revision == 8


def test_promotion_to_champion_ends_the_shadow_held_by_that_version() -> None:
    aliases: Aliases = {"champion": 1, "canary": 2, "shadow": 2}
    change = promotion(aliases, tags_of(1, 2), 2, "champion")
    assert "shadow" in change.remove_aliases
    new = written(state(active_version=1, canary_version=2, canary_weight=10, shadow_version=2), change)
    assert routes(new) == (2, None, 0, None)


def test_promotion_to_champion_keeps_another_versions_canary_and_shadow() -> None:
    policy = RolloutPolicy(required_stages=("staging",))
    aliases: Aliases = {"champion": 1, "canary": 2, "staging": 3, "shadow": 4}
    change = plan_transition(aliases, tags_of(1, 2, 3, 4), 3, "champion", policy, manual=True)
    new = written(state(active_version=1, canary_version=2, canary_weight=10, shadow_version=4), change)
    assert routes(new) == (3, 2, 10, 4)


def test_first_champion_becomes_active_while_nothing_was_routed() -> None:
    change = plan_transition({"candidate": 1}, tags_of(1), 1, "champion", POLICY, manual=False)
    assert routes(written(state(), change)) == (1, None, 0, None)


def test_promotion_to_staging_changes_no_route() -> None:
    rollout = state(active_version=1, canary_version=2, canary_weight=10, revision=3)
    change = promotion({"champion": 1, "canary": 2, "candidate": 3}, tags_of(1, 2, 3), 3, "staging")
    assert change.to_stage == "staging" and not change.is_noop
    assert after(rollout, change) is None


def test_promotion_to_shadow_mirrors_traffic_to_the_version() -> None:
    change = promotion({"champion": 1, "staging": 2}, tags_of(1, 2), 2, "shadow")
    assert routes(written(state(active_version=1), change)) == (1, None, 0, 2)


def test_a_new_shadow_replaces_the_previous_one_and_leaves_the_canary() -> None:
    aliases: Aliases = {"champion": 1, "canary": 2, "shadow": 3, "staging": 4}
    change = promotion(aliases, tags_of(1, 2, 3, 4), 4, "shadow")
    new = written(state(active_version=1, canary_version=2, canary_weight=50, shadow_version=3), change)
    assert routes(new) == (1, 2, 50, 4)


def test_an_operator_moving_the_canary_back_to_staging_ends_the_canary() -> None:
    change = promotion({"champion": 1, "canary": 2}, tags_of(1, 2), 2, "staging")
    assert change.from_stage == "canary"
    new = written(state(active_version=1, canary_version=2, canary_weight=50), change)
    assert routes(new) == (1, None, 0, None)


# ---- after_change: rejections and rollbacks ----------------------------------------------------------


def test_rejecting_the_canary_ends_the_canary() -> None:
    change = plan_rejection({"champion": 1, "canary": 2}, tags_of(1, 2), 2)
    new = written(state(active_version=1, canary_version=2, canary_weight=50), change)
    assert routes(new) == (1, None, 0, None)


def test_rejecting_the_shadow_ends_the_shadow() -> None:
    change = plan_rejection({"champion": 1, "shadow": 3}, tags_of(1, 3), 3)
    new = written(state(active_version=1, canary_version=2, canary_weight=10, shadow_version=3), change)
    assert routes(new) == (1, 2, 10, None)


def test_rejecting_an_unrouted_version_changes_no_route() -> None:
    rollout = state(active_version=1, canary_version=2, canary_weight=10, shadow_version=3)
    change = plan_rejection({"champion": 1, "canary": 2, "shadow": 3, "candidate": 4}, tags_of(1, 2, 3, 4), 4)
    assert not change.is_noop
    assert after(rollout, change) is None


def test_a_canary_rollback_ends_the_canary_and_the_champion_keeps_serving() -> None:
    aliases: Aliases = {"champion": 1, "canary": 2}
    change = plan_rollback(aliases, [], stage="canary", tags=tags_of(1, 2))
    assert change.kind == "rollback" and change.to_stage is None
    new = written(state(active_version=1, canary_version=2, canary_weight=10), change)
    assert routes(new) == (1, None, 0, None)


def test_a_canary_rollback_also_ends_that_versions_shadow() -> None:
    aliases: Aliases = {"champion": 1, "canary": 2, "shadow": 2}
    change = plan_rollback(aliases, [], stage="canary", tags=tags_of(1, 2))
    new = written(state(active_version=1, canary_version=2, canary_weight=50, shadow_version=2), change)
    assert routes(new) == (1, None, 0, None)


def test_a_champion_rollback_makes_the_previous_champion_active() -> None:
    # Walk the model through its life with the planners, recording each change as the audit log would.
    aliases: Aliases = {}
    tags = tags_of(1, 2)
    rollout = state()
    history: list[AuditEntry] = []
    steps: list[tuple[int, Stage]] = [(1, "champion"), (2, "staging"), (2, "canary"), (2, "champion")]
    for version, to in steps:
        change = plan_transition(aliases, tags, version, to, POLICY, manual=False)
        history.append(change.entry("digits", actor="registry", reason="test"))
        aliases, tags = change.apply(aliases, tags)
        rollout = after(rollout, change) or rollout
    assert aliases == {"champion": 2}
    assert routes(rollout) == (2, None, 0, None)

    change = plan_rollback(aliases, history, tags=tags)
    assert change.version == 1 and change.replaced == 2 and change.to_stage == "champion"
    new = written(rollout, change, reason="champion 2 misbehaves")
    assert routes(new) == (1, None, 0, None)
    assert new.reason == "champion 2 misbehaves"


def test_a_champion_rollback_ends_the_canary_or_shadow_of_the_version_it_goes_back_to() -> None:
    # Version 1, a former champion, was brought back through staging to canary, and mirrors traffic too.
    history = [
        AuditEntry(
            model="digits", version=1, kind="transition", to_stage="champion", actor="registry", reason="x"
        ),
        AuditEntry(
            model="digits",
            version=2,
            kind="transition",
            from_stage="canary",
            to_stage="champion",
            replaced_version=1,
            actor="registry",
            reason="x",
        ),
    ]
    aliases: Aliases = {"champion": 2, "canary": 1, "shadow": 1}
    change = plan_rollback(aliases, history, tags=tags_of(1, 2))
    assert change.version == 1
    new = written(state(active_version=2, canary_version=1, canary_weight=10, shadow_version=1), change)
    assert routes(new) == (1, None, 0, None)


# ---- after_change: nothing to write ------------------------------------------------------------------


def test_a_change_that_leaves_routing_as_it_is_returns_none() -> None:
    # The active version "promoted" to champion again: the routing already says so.
    replay = promotion({"champion": 1}, tags_of(1), 1, "champion")
    assert replay.is_noop
    assert after(state(active_version=1, revision=9), replay) is None
    # A shadow that is already routed, and a canary rollback of a canary the routing already dropped.
    assert (
        after(state(active_version=1, shadow_version=2), Transition("transition", 2, None, "shadow")) is None
    )
    rollback = plan_rollback({"champion": 1, "canary": 2}, [], stage="canary")
    assert after(state(active_version=1), rollback) is None


def test_each_write_bumps_the_revision_by_one() -> None:
    aliases: Aliases = {"champion": 1, "staging": 2}
    tags = tags_of(1, 2)
    rollout = state(active_version=1, revision=0)
    revisions = []
    for to in ("canary", "champion"):
        change = promotion(aliases, tags, 2, to)
        aliases, tags = change.apply(aliases, tags)
        rollout = written(rollout, change)
        revisions.append(rollout.revision)
    assert revisions == [1, 2]
    assert routes(rollout) == (2, None, 0, None)


# ---- step_weight -------------------------------------------------------------------------------------


def test_step_weight_goes_to_the_next_step_of_the_plan() -> None:
    assert step_weight([10, 50], 10) == 50
    assert step_weight([5, 25, 75], 25) == 75


def test_step_weight_after_the_last_step_is_none() -> None:
    assert step_weight([10, 50], 50) is None
    assert step_weight([100], 100) is None


def test_step_weight_from_a_weight_not_in_the_plan_goes_to_the_next_higher_step() -> None:
    assert step_weight([10, 50], 20) == 50
    assert step_weight([10, 50], 5) == 10
    assert step_weight([10, 50], 60) is None


# ---- manual_route ------------------------------------------------------------------------------------


def route(
    rollout: RolloutState,
    tags: dict[int, set[str]],
    kind: Any,
    version: int | None,
    weight: int | None = None,
) -> RolloutState:
    new = manual_route(rollout, tags, kind, version, weight, actor=ACTOR, reason="by hand")
    assert new.revision == rollout.revision + 1
    assert new.updated_by == ACTOR and new.reason == "by hand"
    return new


def refused(
    code: str,
    rollout: RolloutState,
    tags: dict[int, set[str]],
    kind: Any,
    version: int | None,
    weight: int | None = None,
) -> IllegalTransition:
    with pytest.raises(IllegalTransition) as info:
        manual_route(rollout, tags, kind, version, weight, actor=ACTOR, reason="by hand")
    assert info.value.code == code, str(info.value)
    return info.value


ROUTED = state(active_version=1, canary_version=2, canary_weight=10, shadow_version=3, revision=2)
TAGS = tags_of(1, 2, 3, 4, v5={"rejected"}, v6={"retired"})


def test_blue_green_sends_everything_to_the_version() -> None:
    assert routes(route(ROUTED, TAGS, "blue_green", 4)) == (4, 2, 10, 3)
    assert routes(route(ROUTED, TAGS, "blue_green", 6)) == (6, 2, 10, 3)  # a retired champion may come back


def test_blue_green_to_the_canary_or_shadow_ends_that_route() -> None:
    assert routes(route(ROUTED, TAGS, "blue_green", 2)) == (2, None, 0, 3)
    assert routes(route(ROUTED, TAGS, "blue_green", 3)) == (3, 2, 10, None)


def test_canary_routes_the_weight_to_the_version() -> None:
    assert routes(route(ROUTED, TAGS, "canary", 4, 30)) == (1, 4, 30, 3)
    assert routes(route(ROUTED, TAGS, "canary", 2, 100)) == (1, 2, 100, 3)
    assert routes(route(ROUTED, TAGS, "canary", 3, 1)) == (1, 3, 1, 3)
    assert routes(route(state(), TAGS, "canary", 4, 50)) == (None, 4, 50, None)


def test_shadow_mirrors_traffic_to_the_version() -> None:
    assert routes(route(ROUTED, TAGS, "shadow", 4)) == (1, 2, 10, 4)
    assert routes(route(ROUTED, TAGS, "shadow", 2)) == (1, 2, 10, 2)


def test_clear_ends_canary_and_shadow_and_keeps_the_active_version() -> None:
    assert routes(route(ROUTED, TAGS, "clear", None)) == (1, None, 0, None)
    assert routes(route(ROUTED, TAGS, "clear", 4, 50)) == (1, None, 0, None)  # version and weight ignored


def test_a_route_to_an_unknown_version_is_refused() -> None:
    error = refused("unknown_version", ROUTED, TAGS, "blue_green", 9)
    assert "registered: 1, 2, 3, 4, 5, 6" in error.message
    refused("unknown_version", ROUTED, TAGS, "canary", 9, 10)
    refused("unknown_version", ROUTED, TAGS, "shadow", 9)
    assert "registered: none" in refused("unknown_version", state(), {}, "shadow", 1).message


def test_a_route_to_a_rejected_version_is_refused() -> None:
    for kind, weight in (("blue_green", None), ("canary", 10), ("shadow", None)):
        error = refused("rejected_version", ROUTED, TAGS, kind, 5, weight)
        assert error.http_status == 409


@pytest.mark.parametrize("weight", [None, 0, 101, -5])
def test_a_canary_route_needs_a_weight_within_1_to_100(weight: int | None) -> None:
    error = refused("bad_input", ROUTED, TAGS, "canary", 4, weight)
    assert "1..100" in error.message
    assert error.http_status == 422


def test_the_active_version_cannot_also_be_canary_or_shadow() -> None:
    assert "cannot also be the canary" in refused("bad_input", ROUTED, TAGS, "canary", 1, 10).message
    assert "cannot shadow itself" in refused("bad_input", ROUTED, TAGS, "shadow", 1).message


@pytest.mark.parametrize("kind", ["blue_green", "canary", "shadow"])
def test_a_route_other_than_clear_names_a_version(kind: str) -> None:
    assert "names a version" in refused("bad_input", ROUTED, TAGS, kind, None, 10).message


def test_a_refused_route_leaves_the_state_untouched() -> None:
    before = ROUTED.model_dump()
    refused("bad_input", ROUTED, TAGS, "canary", 4, 0)
    assert ROUTED.model_dump() == before


# ---- revised -----------------------------------------------------------------------------------------


def test_revised_keeps_the_fields_not_changed() -> None:
    old_time = datetime(2024, 1, 1, tzinfo=UTC)
    rollout = state(
        active_version=1,
        canary_version=2,
        canary_weight=10,
        shadow_version=3,
        revision=41,
        updated_at=old_time,
        updated_by="registry",
        reason="before",
    )
    new = revised(rollout, ACTOR, "step up", canary_weight=50)
    assert routes(new) == (1, 2, 50, 3)
    assert new.model == "digits"
    assert new.revision == 42
    assert new.updated_by == ACTOR and new.reason == "step up"
    assert new.updated_at > old_time + timedelta(days=1)
    assert routes(rollout) == (1, 2, 10, 3) and rollout.revision == 41  # the old state is not changed


def test_revised_without_changes_still_bumps_the_revision() -> None:
    rollout = state(active_version=1, revision=3)
    new = revised(rollout, ACTOR, "touch")
    assert routes(new) == routes(rollout)
    assert new.revision == 4


def test_revised_validates_the_result() -> None:
    with pytest.raises(ValidationError, match="both the active and the canary"):
        revised(state(active_version=1), ACTOR, "bad", canary_version=1, canary_weight=10)
    with pytest.raises(ValidationError, match="no canary_version"):
        revised(state(active_version=1), ACTOR, "bad", canary_weight=10)
