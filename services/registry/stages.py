"""The registry's stages as a state machine: what a transition, a rejection or a rollback changes, or why
it is illegal. Pure domain: no MLflow, no NATS; the caller reads the state, plans, then writes.

The state of one model (DESIGN.md "Rules of the domain"):

- ``Aliases``: the current pointers, stage -> version (MLflow aliases ``candidate``, ``staging``, ``canary``,
  ``champion``, ``shadow``); a stage missing from the dict points at no version.
- tags, version -> set of tags, for every registered version (an untagged version maps to an empty set):
  ``rejected`` (failed its gates, a canary or was rolled back; never promoted again) and ``retired`` (a
  former champion). A version missing from the tags is unknown.

Versions move up the pipeline ``candidate -> staging -> canary -> champion``; ``shadow`` is beside it (a
mirror of the champion's traffic, any version but the champion). A version holds one pipeline stage at a
time: moving it up takes its lower aliases away. A registered version without any alias counts as a
candidate. The policy's ``required_stages`` may not be skipped, manual promotions included, except that with
``first_to_champion`` a version may go straight to champion while the model has no champion.

Errors are ``IllegalTransition(code, message)``; the admin API maps the code to an HTTP status:

==========================  ====  ==============================================================
code                        HTTP  when
==========================  ====  ==============================================================
``unknown_model``           404   the model has no registered version (raised by the caller)
``unknown_version``         404   the version is not registered
``rejected_version``        409   the version is tagged ``rejected``
``skipped_stage``           409   the move skips a stage the policy requires
``illegal_demotion``        409   a move back the pipeline that makes no sense (or is not manual)
``champion_not_allowed``    409   the champion cannot be shadowed or rejected (roll it back)
``no_champion``             409   rollback of the champion while there is none
``no_previous_champion``    409   rollback, but the audit log names no earlier champion to go to
``no_canary``               409   rollback of the canary while there is none
``bad_input``               422   a version below 1 or a stage that does not exist
==========================  ====  ==============================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal, TypeAlias

from contracts.audit import AuditEntry
from contracts.events import GateResult
from contracts.kv import STAGES, RolloutPolicy, Stage

__all__ = [
    "HTTP_STATUS",
    "PIPELINE",
    "REJECTED",
    "RETIRED",
    "Aliases",
    "IllegalTransition",
    "Tags",
    "Transition",
    "TransitionKind",
    "plan_rejection",
    "plan_rollback",
    "plan_transition",
    "stage_of",
]

Aliases: TypeAlias = dict[Stage, int]
"""stage -> the version its alias points at; a missing stage points at none."""
Tags: TypeAlias = Mapping[int, AbstractSet[str]]
"""version -> its tags, for every registered version of the model."""
TransitionKind = Literal["transition", "rejection", "rollback"]

REJECTED: Final = "rejected"
RETIRED: Final = "retired"
PIPELINE: tuple[Stage, ...] = ("candidate", "staging", "canary", "champion")
_LEVEL: dict[Stage, int] = {stage: level for level, stage in enumerate(PIPELINE)}

HTTP_STATUS: dict[str, int] = {
    "unknown_model": 404,
    "unknown_version": 404,
    "rejected_version": 409,
    "skipped_stage": 409,
    "illegal_demotion": 409,
    "champion_not_allowed": 409,
    "no_champion": 409,
    "no_previous_champion": 409,
    "no_canary": 409,
    "bad_input": 422,
}


class IllegalTransition(Exception):
    """A transition or rollback that is not allowed; ``code`` is one of ``HTTP_STATUS``."""

    def __init__(self, code: str, message: str) -> None:
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown IllegalTransition code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Transition:
    """What one planned change does to a model's aliases and tags; the caller writes exactly this.

    - transition: ``version`` moves from ``from_stage`` (the pipeline stage it held, None: none) to
      ``to_stage``; ``replaced`` is the version that held ``to_stage`` before (a replaced champion is
      tagged ``retired``).
    - rejection: ``version`` loses every alias and is tagged ``rejected``; ``to_stage`` is None.
    - rollback of the champion: ``version`` is the previous champion it goes back to (``to_stage`` champion)
      and ``replaced`` the champion rolled back from. Rollback of a canary: ``version`` is the canary, which
      loses its aliases (``from_stage`` canary, ``to_stage`` None) while the champion keeps serving.

    ``set_aliases`` are written (an alias moves to the version), ``remove_aliases`` are deleted (no version
    holds them afterwards); ``add_tags``/``remove_tags`` are per version. A transition that changes nothing
    (the version already holds the stage) has ``is_noop`` true: replaying it is harmless.
    """

    kind: TransitionKind
    version: int
    from_stage: Stage | None
    to_stage: Stage | None
    replaced: int | None = None
    set_aliases: dict[Stage, int] = field(default_factory=dict)
    remove_aliases: frozenset[Stage] = frozenset()
    add_tags: dict[int, frozenset[str]] = field(default_factory=dict)
    remove_tags: dict[int, frozenset[str]] = field(default_factory=dict)

    @property
    def is_noop(self) -> bool:
        return not (self.set_aliases or self.remove_aliases or self.add_tags or self.remove_tags)

    def apply(self, current: Mapping[Stage, int], tags: Tags) -> tuple[Aliases, dict[int, set[str]]]:
        """The aliases and tags after this change (what the registry reads back once it wrote it)."""
        aliases: Aliases = {s: v for s, v in current.items() if s not in self.remove_aliases}
        aliases.update(self.set_aliases)
        new_tags = {v: set(t) for v, t in tags.items()}
        for v, removed in self.remove_tags.items():
            new_tags.setdefault(v, set()).difference_update(removed)
        for v, added in self.add_tags.items():
            new_tags.setdefault(v, set()).update(added)
        return aliases, new_tags

    def entry(
        self,
        model: str,
        *,
        actor: str,
        reason: str,
        time: datetime | None = None,
        gate_report: Iterable[GateResult] = (),
        cause_event_id: str | None = None,
    ) -> AuditEntry:
        """The audit entry that records this change."""
        extra = {"time": time} if time is not None else {}
        return AuditEntry(
            model=model,
            version=self.version,
            kind=self.kind,
            from_stage=self.from_stage,
            to_stage=self.to_stage,
            replaced_version=self.replaced,
            actor=actor,
            reason=reason,
            gate_report=list(gate_report),
            cause_event_id=cause_event_id,
            **extra,
        )


def stage_of(current: Mapping[Stage, int], version: int) -> Stage | None:
    """The pipeline stage a version holds (the highest, should it hold several), or None."""
    held = [stage for stage in PIPELINE if current.get(stage) == version]
    return held[-1] if held else None


def plan_transition(
    current: Mapping[Stage, int],
    tags: Tags,
    version: int,
    to: Stage,
    policy: RolloutPolicy,
    *,
    manual: bool,
) -> Transition:
    """Plan moving ``version`` to stage ``to``, or raise ``IllegalTransition`` saying why not.

    ``manual`` is true for an operator's promotion (CLI or admin API): only an operator may move a canary
    back to staging (aborting it by hand); the registry's own transitions only move forward.
    """
    _check_input(version, to)
    _check_version(tags, version, action=f"promote version {version}")
    held = stage_of(current, version)
    retired = {version: frozenset({RETIRED})} if RETIRED in tags[version] else {}

    if to == "shadow":
        if current.get("shadow") == version:
            return Transition("transition", version, held, "shadow")
        if current.get("champion") == version:
            raise IllegalTransition(
                "champion_not_allowed",
                f"version {version} is the champion: it serves all traffic, so it cannot also be its shadow",
            )
        return Transition(
            "transition",
            version,
            held,
            "shadow",
            replaced=current.get("shadow"),
            set_aliases={"shadow": version},
            remove_tags=retired,
        )

    if held == to:
        return Transition("transition", version, held, to)
    level_from = _LEVEL[held] if held is not None else 0  # a version with no alias counts as a candidate
    level_to = _LEVEL[to]

    if held is not None and level_to <= level_from:
        _check_demotion(version, held, to, manual=manual)
    else:
        skipped = [s for s in policy.required_stages if level_from < _LEVEL[s] < level_to]
        shortcut = to == "champion" and policy.first_to_champion and "champion" not in current
        if skipped and not shortcut:
            why = ""
            if to == "champion" and policy.first_to_champion:
                why = (
                    f"; going straight to champion is only allowed while there is none "
                    f"(version {current['champion']} is)"
                )
            raise IllegalTransition(
                "skipped_stage",
                f"cannot promote version {version} from {held or 'no stage'} to {to}: the policy requires it "
                f"to pass through {' and '.join(skipped)} first{why}",
            )

    remove = {s for s in PIPELINE if s != to and current.get(s) == version}
    if to == "champion" and current.get("shadow") == version:
        remove.add("shadow")  # the champion cannot mirror traffic to itself
    replaced = current.get(to)
    replaced = replaced if replaced != version else None
    add = {replaced: frozenset({RETIRED})} if to == "champion" and replaced is not None else {}
    return Transition(
        "transition",
        version,
        held,
        to,
        replaced=replaced,
        set_aliases={to: version},
        remove_aliases=frozenset(remove),
        add_tags=add,
        remove_tags=retired,
    )


def plan_rejection(current: Mapping[Stage, int], tags: Tags, version: int) -> Transition:
    """Plan tagging ``version`` rejected (it failed its gates): it loses every alias it holds."""
    _check_input(version, None)
    if version not in tags:
        raise IllegalTransition("unknown_version", f"version {version} is not registered")
    if REJECTED in tags[version]:
        return Transition("rejection", version, stage_of(current, version), None)
    if current.get("champion") == version:
        raise IllegalTransition(
            "champion_not_allowed",
            f"version {version} is the champion and cannot be rejected: roll it back instead",
        )
    return Transition(
        "rejection",
        version,
        stage_of(current, version),
        None,
        remove_aliases=frozenset(s for s, v in current.items() if v == version),
        add_tags={version: frozenset({REJECTED})},
    )


def plan_rollback(
    current: Mapping[Stage, int],
    history: Iterable[AuditEntry],
    *,
    stage: Literal["champion", "canary"] = "champion",
    tags: Tags | None = None,
    mark: Literal["rejected", "retired"] = REJECTED,
) -> Transition:
    """Plan a rollback, or raise ``IllegalTransition``.

    ``champion``: back to the previous champion that the audit ``history`` (oldest first) names, skipping
    champions that were rolled back themselves; with ``tags``, also skipping versions no longer registered or
    tagged rejected. ``canary``: the canary loses its aliases and the champion keeps serving. The version
    rolled back from is tagged ``mark`` (``rejected`` by default, so nothing promotes it again by accident).
    """
    if stage == "canary":
        canary = current.get("canary")
        if canary is None:
            raise IllegalTransition("no_canary", "there is no canary to roll back")
        return Transition(
            "rollback",
            canary,
            "canary",
            None,
            remove_aliases=frozenset(s for s, v in current.items() if v == canary),
            add_tags={canary: frozenset({mark})},
        )
    if stage != "champion":
        raise IllegalTransition("bad_input", f"cannot roll back stage {stage!r}: use champion or canary")

    champion = current.get("champion")
    if champion is None:
        raise IllegalTransition("no_champion", "there is no champion to roll back")
    target = _previous_champion(history, champion, tags)
    if target is None:
        raise IllegalTransition(
            "no_previous_champion",
            f"cannot roll back version {champion}: the audit log names no champion before it",
        )
    remove = {s for s, v in current.items() if v == target and s != "champion"}
    retired = tags is None or RETIRED in tags.get(target, ())
    return Transition(
        "rollback",
        target,
        stage_of(current, target),
        "champion",
        replaced=champion,
        set_aliases={"champion": target},
        remove_aliases=frozenset(remove),
        add_tags={champion: frozenset({mark})},
        remove_tags={target: frozenset({RETIRED})} if retired else {},
    )


def _previous_champion(history: Iterable[AuditEntry], champion: int, tags: Tags | None) -> int | None:
    # The champions in order, as a stack: a promotion pushes, a rollback pops back to its target.
    stack: list[int] = []
    for entry in history:
        if entry.to_stage != "champion" or entry.version is None:
            continue
        if entry.kind == "rollback":
            while stack and stack[-1] != entry.version:
                stack.pop()
            if not stack:
                stack.append(entry.version)
        elif entry.kind == "transition" and (not stack or stack[-1] != entry.version):
            if entry.version in stack:
                stack.remove(entry.version)
            stack.append(entry.version)
    if champion in stack:
        stack = stack[: stack.index(champion)]
    for version in reversed(stack):
        if tags is None or (version in tags and REJECTED not in tags[version]):
            return version
    return None


def _check_input(version: int, to: str | None) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise IllegalTransition("bad_input", f"invalid version {version!r}: versions are numbers from 1")
    if to is not None and to not in STAGES:
        raise IllegalTransition("bad_input", f"unknown stage {to!r}: use one of {', '.join(STAGES)}")


def _check_version(tags: Tags, version: int, *, action: str) -> None:
    if version not in tags:
        known = ", ".join(map(str, sorted(tags))) or "none"
        raise IllegalTransition(
            "unknown_version", f"cannot {action}: it is not registered (registered versions: {known})"
        )
    if REJECTED in tags[version]:
        raise IllegalTransition(
            "rejected_version", f"cannot {action}: it is tagged rejected (train a new version instead)"
        )


def _check_demotion(version: int, held: Stage, to: Stage, *, manual: bool) -> None:
    if held == "champion":
        raise IllegalTransition(
            "illegal_demotion",
            f"version {version} is the champion and cannot move back to {to}: promote another version to "
            "champion or roll back",
        )
    if to == "candidate":
        raise IllegalTransition(
            "illegal_demotion",
            f"version {version} is at {held} and cannot move back to candidate: candidate means awaiting "
            "the gates, which it passed",
        )
    if not manual:
        raise IllegalTransition(
            "illegal_demotion",
            f"the registry moves versions forward only, not version {version} from {held} back to {to}: "
            "a failing canary is rolled back",
        )
    # an operator moving a canary back to staging: aborts the canary by hand
