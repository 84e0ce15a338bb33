"""The registry's stage machine: promotions along the policy's stages, illegal moves, rollbacks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from contracts.audit import AuditEntry
from contracts.events import GateResult
from contracts.kv import RolloutPolicy, Stage
from services.registry.stages import (
    HTTP_STATUS,
    Aliases,
    IllegalTransition,
    Transition,
    plan_rejection,
    plan_rollback,
    plan_transition,
    stage_of,
)

pytestmark = pytest.mark.unit

DEFAULT = RolloutPolicy()  # staging and canary required, first passing model straight to champion
STRICT = RolloutPolicy(first_to_champion=False)


def tags_of(*versions: int, **extra: set[str]) -> dict[int, set[str]]:
    """Every version registered and untagged, plus ``v3={"rejected"}``-style extras."""
    tags: dict[int, set[str]] = {v: set() for v in versions}
    for key, value in extra.items():
        tags[int(key.removeprefix("v"))] = set(value)
    return tags


def promote(
    aliases: Aliases,
    tags: dict[int, set[str]],
    version: int,
    to: Stage,
    policy: RolloutPolicy = DEFAULT,
    manual: bool = False,
) -> tuple[Transition, Aliases, dict[int, set[str]]]:
    transition = plan_transition(aliases, tags, version, to, policy, manual=manual)
    new_aliases, new_tags = transition.apply(aliases, tags)
    return transition, new_aliases, new_tags


def refused(code: str, match: str, *args: Any, **kwargs: Any) -> IllegalTransition:
    with pytest.raises(IllegalTransition, match=match) as info:
        plan_transition(*args, **kwargs)
    assert info.value.code == code
    return info.value


# ---- promotions --------------------------------------------------------------------------------------


def test_first_passing_model_goes_straight_to_champion_when_the_policy_allows() -> None:
    transition, aliases, tags = promote({"candidate": 1}, tags_of(1), 1, "champion")
    assert aliases == {"champion": 1}
    assert transition.from_stage == "candidate" and transition.to_stage == "champion"
    assert transition.set_aliases == {"champion": 1}
    assert transition.remove_aliases == {"candidate"}
    assert transition.replaced is None and not transition.add_tags
    assert tags == {1: set()}


def test_straight_to_champion_only_while_there_is_no_champion() -> None:
    error = refused(
        "skipped_stage",
        "pass through staging and canary first; going straight to champion is only allowed while there is "
        r"none \(version 1 is\)",
        {"champion": 1, "candidate": 2},
        tags_of(1, 2),
        2,
        "champion",
        DEFAULT,
        manual=False,
    )
    assert error.http_status == 409


def test_without_first_to_champion_a_version_walks_every_required_stage() -> None:
    refused(
        "skipped_stage",
        "cannot promote version 1 from candidate to champion: the policy requires it to pass through "
        "staging and canary first$",
        {"candidate": 1},
        tags_of(1),
        1,
        "champion",
        STRICT,
        manual=True,
    )
    aliases: Aliases = {"candidate": 1}
    tags = tags_of(1)
    for stage in ("staging", "canary", "champion"):
        _, aliases, tags = promote(aliases, tags, 1, stage, STRICT)
        assert aliases == {stage: 1}


def test_challenger_walks_staging_canary_champion_and_the_old_champion_is_retired() -> None:
    aliases: Aliases = {"champion": 1, "candidate": 2}
    tags = tags_of(1, 2)
    _, aliases, tags = promote(aliases, tags, 2, "staging")
    assert aliases == {"champion": 1, "staging": 2}
    refused("skipped_stage", "pass through canary first", aliases, tags, 2, "champion", DEFAULT, manual=True)
    _, aliases, tags = promote(aliases, tags, 2, "canary")
    assert aliases == {"champion": 1, "canary": 2}
    transition, aliases, tags = promote(aliases, tags, 2, "champion")
    assert aliases == {"champion": 2}
    assert transition.replaced == 1
    assert transition.add_tags == {1: {"retired"}}
    assert tags == {1: {"retired"}, 2: set()}


def test_only_the_stages_the_policy_requires_must_be_passed() -> None:
    policy = RolloutPolicy(required_stages=("staging",), first_to_champion=False)
    refused("skipped_stage", "pass through staging first", {}, tags_of(1), 1, "canary", policy, manual=False)
    _, aliases, _ = promote({"staging": 1}, tags_of(1), 1, "champion", policy)
    assert aliases == {"champion": 1}
    _, aliases, _ = promote({"candidate": 1}, tags_of(1), 1, "staging", RolloutPolicy(required_stages=()))
    assert aliases == {"staging": 1}


def test_a_version_without_alias_counts_as_candidate_and_leaves_retired() -> None:
    transition, aliases, tags = promote({"champion": 2}, tags_of(2, v1={"retired"}), 1, "staging")
    assert transition.from_stage is None
    assert transition.remove_tags == {1: {"retired"}}
    assert aliases == {"champion": 2, "staging": 1} and tags[1] == set()


def test_repeating_a_promotion_changes_nothing() -> None:
    transition = plan_transition({"champion": 1}, tags_of(1), 1, "champion", DEFAULT, manual=False)
    assert transition.is_noop
    assert transition.apply({"champion": 1}, tags_of(1)) == ({"champion": 1}, {1: set()})


def test_shadow_is_beside_the_pipeline() -> None:
    transition, aliases, _ = promote(
        {"champion": 1, "staging": 2, "shadow": 3}, tags_of(1, 2, 3), 2, "shadow"
    )
    assert aliases == {"champion": 1, "staging": 2, "shadow": 2}
    assert transition.replaced == 3
    _, aliases, _ = promote(aliases, tags_of(1, 2, 3), 2, "canary")
    assert aliases == {"champion": 1, "canary": 2, "shadow": 2}
    _, aliases, _ = promote(aliases, tags_of(1, 2, 3), 2, "champion")
    assert aliases == {"champion": 2}  # the champion is never its own shadow
    refused(
        "champion_not_allowed",
        "cannot also be its shadow",
        aliases,
        tags_of(1, 2),
        2,
        "shadow",
        DEFAULT,
        manual=True,
    )


# ---- illegal transitions -----------------------------------------------------------------------------


def test_unknown_version_is_404() -> None:
    error = refused(
        "unknown_version",
        r"cannot promote version 9: it is not registered \(registered versions: 1, 2\)",
        {"champion": 1},
        tags_of(1, 2),
        9,
        "staging",
        DEFAULT,
        manual=True,
    )
    assert error.http_status == 404


def test_promoting_a_rejected_version_is_refused() -> None:
    refused(
        "rejected_version",
        "cannot promote version 2: it is tagged rejected",
        {"champion": 1},
        tags_of(1, v2={"rejected"}),
        2,
        "staging",
        DEFAULT,
        manual=True,
    )


@pytest.mark.parametrize(
    ("aliases", "version", "to", "manual", "match"),
    [
        ({"champion": 1}, 1, "canary", True, "version 1 is the champion and cannot move back to canary"),
        ({"champion": 1}, 1, "candidate", True, "is the champion and cannot move back"),
        ({"staging": 1}, 1, "candidate", True, "version 1 is at staging and cannot move back to candidate"),
        ({"canary": 1}, 1, "candidate", True, "candidate means awaiting the gates"),
        ({"canary": 1}, 1, "staging", False, "the registry moves versions forward only"),
    ],
)
def test_demotions_that_make_no_sense_are_refused(
    aliases: Aliases, version: int, to: Stage, manual: bool, match: str
) -> None:
    refused("illegal_demotion", match, aliases, tags_of(1), version, to, DEFAULT, manual=manual)


def test_an_operator_may_move_a_canary_back_to_staging() -> None:
    transition, aliases, _ = promote({"champion": 1, "canary": 2}, tags_of(1, 2), 2, "staging", manual=True)
    assert aliases == {"champion": 1, "staging": 2}
    assert transition.from_stage == "canary" and transition.remove_aliases == {"canary"}


@pytest.mark.parametrize(("version", "to"), [(0, "staging"), (-3, "champion"), (1, "production")])
def test_bad_input_is_422(version: int, to: Any) -> None:
    error = refused(
        "bad_input", "invalid version|unknown stage", {}, tags_of(1), version, to, DEFAULT, manual=True
    )
    assert error.http_status == 422


def test_every_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS.values()) == {404, 409, 422}
    with pytest.raises(ValueError, match="unknown IllegalTransition code"):
        IllegalTransition("nope", "x")
    assert str(IllegalTransition("no_champion", "there is none")) == "no_champion: there is none"


# ---- rejection --------------------------------------------------------------------------------------


def test_rejection_tags_the_version_and_takes_its_aliases() -> None:
    transition = plan_rejection({"champion": 1, "candidate": 2}, tags_of(1, 2), 2)
    assert transition.kind == "rejection" and transition.from_stage == "candidate"
    assert transition.apply({"champion": 1, "candidate": 2}, tags_of(1, 2)) == (
        {"champion": 1},
        {1: set(), 2: {"rejected"}},
    )
    assert plan_rejection({"champion": 1}, tags_of(1, v2={"rejected"}), 2).is_noop
    with pytest.raises(IllegalTransition, match="roll it back instead"):
        plan_rejection({"champion": 1}, tags_of(1), 1)


# ---- rollback ---------------------------------------------------------------------------------------


def champion_entry(version: int, replaced: int | None = None, kind: Any = "transition") -> AuditEntry:
    return AuditEntry(
        model="digits",
        version=version,
        kind=kind,
        from_stage="canary" if kind == "transition" else None,
        to_stage="champion",
        replaced_version=replaced,
        actor="registry",
        reason="test",
    )


def history_of(*entries: AuditEntry) -> list[AuditEntry]:
    noise = [
        AuditEntry(
            model="digits", version=9, kind="transition", to_stage="staging", actor="registry", reason="x"
        ),
        AuditEntry(model="digits", kind="rollout", rollout={"model": "digits"}, actor="registry", reason="x"),
        AuditEntry(model="digits", version=8, kind="rejection", actor="registry", reason="gates"),
    ]
    return [*noise, *entries]


def test_rollback_goes_to_the_previous_champion_named_by_the_history() -> None:
    history = history_of(champion_entry(1), champion_entry(2, 1), champion_entry(3, 2))
    transition = plan_rollback({"champion": 3}, history, tags=tags_of(3, v1={"retired"}, v2={"retired"}))
    assert transition.kind == "rollback"
    assert (transition.version, transition.replaced, transition.to_stage) == (2, 3, "champion")
    aliases, tags = transition.apply({"champion": 3}, tags_of(3, v1={"retired"}, v2={"retired"}))
    assert aliases == {"champion": 2}
    assert tags == {1: {"retired"}, 2: set(), 3: {"rejected"}}

    entry = transition.entry("digits", actor="admin:ana", reason="accuracy dropped", cause_event_id="req-1")
    assert (entry.kind, entry.version, entry.replaced_version, entry.actor) == ("rollback", 2, 3, "admin:ana")
    # a second rollback skips the champion rolled back and goes one further
    again = plan_rollback(aliases, [*history, entry])
    assert (again.version, again.replaced) == (1, 2)


def test_rollback_skips_a_champion_that_was_re_promoted_and_versions_no_longer_registered() -> None:
    history = history_of(champion_entry(1), champion_entry(2, 1), champion_entry(1, 2), champion_entry(3, 1))
    assert plan_rollback({"champion": 3}, history).version == 1
    assert plan_rollback({"champion": 3}, history, tags=tags_of(2, 3)).version == 2
    assert plan_rollback({"champion": 3}, history, mark="retired").add_tags == {3: {"retired"}}


def test_rollback_without_a_previous_champion_is_a_clear_error() -> None:
    with pytest.raises(
        IllegalTransition, match="cannot roll back version 1: the audit log names no champion before it"
    ) as info:
        plan_rollback({"champion": 1}, history_of(champion_entry(1)))
    assert info.value.code == "no_previous_champion" and info.value.http_status == 409
    with pytest.raises(IllegalTransition, match="there is no champion to roll back") as info:
        plan_rollback({"candidate": 1}, [])
    assert info.value.code == "no_champion"
    with pytest.raises(IllegalTransition, match="names no champion before it"):
        plan_rollback(
            {"champion": 2},
            history_of(champion_entry(1), champion_entry(2, 1)),
            tags=tags_of(2, v1={"rejected"}),
        )


def test_canary_rollback_leaves_the_champion_serving() -> None:
    transition = plan_rollback({"champion": 1, "canary": 2, "shadow": 2}, [], stage="canary")
    assert (transition.version, transition.from_stage, transition.to_stage) == (2, "canary", None)
    assert transition.apply({"champion": 1, "canary": 2, "shadow": 2}, tags_of(1, 2)) == (
        {"champion": 1},
        {1: set(), 2: {"rejected"}},
    )
    with pytest.raises(IllegalTransition, match="no canary") as info:
        plan_rollback({"champion": 1}, [], stage="canary")
    assert info.value.code == "no_canary"


def test_a_transition_records_itself_as_an_audit_entry() -> None:
    transition = plan_transition(
        {"champion": 1, "canary": 2}, tags_of(1, 2), 2, "champion", DEFAULT, manual=False
    )
    when = datetime(2025, 1, 2, tzinfo=UTC)
    report = [GateResult(name="min_test_accuracy", value=0.97, threshold=0.9, passed=True)]
    entry = transition.entry(
        "digits", actor="registry", reason="canary passed", time=when, gate_report=report
    )
    assert entry.model_dump(exclude={"rollout", "cause_event_id"}) == {
        "model": "digits",
        "version": 2,
        "kind": "transition",
        "from_stage": "canary",
        "to_stage": "champion",
        "replaced_version": 1,
        "actor": "registry",
        "time": when,
        "reason": "canary passed",
        "gate_report": [report[0].model_dump()],
    }
    assert AuditEntry.model_validate_json(entry.model_dump_json()) == entry


def test_audit_entry_requires_the_fields_of_its_kind() -> None:
    with pytest.raises(ValueError, match="names the version"):
        AuditEntry(model="digits", kind="rejection", actor="registry", reason="x")
    with pytest.raises(ValueError, match="to_stage"):
        AuditEntry(model="digits", version=1, kind="transition", actor="registry", reason="x")
    with pytest.raises(ValueError, match="carries the rollout state"):
        AuditEntry(model="digits", kind="rollout", actor="registry", reason="x")
    assert stage_of({"candidate": 1, "staging": 1}, 1) == "staging"
