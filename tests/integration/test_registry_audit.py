"""The audit log on a real nats-server: per-model history in order, idempotent appends, no deletes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from nats.js.errors import APIError

from contracts.audit import AuditEntry
from services.registry.audit import AuditConflict, AuditLog, entry_msg_id
from services.runtime.bus import EventBus
from services.runtime.config import Settings

pytestmark = pytest.mark.integration


def promoted(model: str, version: int, to: str = "champion", cause: str | None = None) -> AuditEntry:
    return AuditEntry.model_validate(
        {
            "model": model,
            "version": version,
            "kind": "transition",
            "from_stage": "canary",
            "to_stage": to,
            "actor": "registry",
            "reason": f"{model} v{version} to {to}",
            "cause_event_id": cause,
        }
    )


async def test_history_returns_each_models_entries_in_order(admin_bus: EventBus) -> None:
    log = AuditLog(lambda: admin_bus.js, admin_bus.subjects)
    sent: dict[str, list[tuple[int, AuditEntry]]] = {"digits": [], "cells": []}
    for version in range(1, 6):
        for model in ("digits", "cells"):
            entry = promoted(model, version, cause=f"trained-{model}-{version}")
            sent[model].append((await log.append(entry), entry))
    rollout = AuditEntry(
        model="digits", kind="rollout", rollout={"canary_weight": 10}, actor="admin:ana", reason="route"
    )
    sent["digits"].append((await log.append(rollout), rollout))

    for model, entries in sent.items():
        history = await log.history(model)
        assert history == entries
        seqs = [seq for seq, _ in history]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert await log.history("digits", limit=2) == sent["digits"][-2:]
    assert await log.history("nobody") == []
    assert await log.last_seq("digits") == sent["digits"][-1][0]
    assert await log.last_seq("nobody") == 0
    # the short-lived readers are gone
    info = await admin_bus.js.stream_info(admin_bus.subjects.audit_stream)
    assert info.state.consumer_count == 0


async def test_a_retried_append_is_dropped(admin_bus: EventBus) -> None:
    log = AuditLog(lambda: admin_bus.js, admin_bus.subjects)
    entry = promoted("digits", 1, cause="trained-1")
    seq = await log.append(entry)
    # the same change caused by the same event, rebuilt after a crash (another time), has the same id
    rebuilt = entry.model_copy(update={"time": entry.time.replace(year=2030)})
    assert entry_msg_id(rebuilt) == entry_msg_id(entry)
    assert await log.append(rebuilt) == seq
    assert await log.append(entry) == seq
    other = await log.append(promoted("digits", 2, cause="trained-2"))
    assert other > seq
    assert [s for s, _ in await log.history("digits")] == [seq, other]


async def test_a_conditional_append_loses_to_a_concurrent_one(admin_bus: EventBus) -> None:
    log = AuditLog(lambda: admin_bus.js, admin_bus.subjects)
    seen = await log.last_seq("digits")
    assert seen == 0
    first = log.append(promoted("digits", 1, cause="a"), expected_last_seq=seen)
    second = log.append(promoted("digits", 2, cause="b"), expected_last_seq=seen)
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["AuditConflict", "int"]
    assert len(await log.history("digits")) == 1
    # retrying the winner's append is still a duplicate, not a conflict
    winner = next(r for r in results if isinstance(r, int))
    (_, entry), *_ = await log.history("digits")
    assert await log.append(entry, expected_last_seq=seen) == winner
    with pytest.raises(AuditConflict, match="another registry replica"):
        await log.append(promoted("digits", 3, cause="c"), expected_last_seq=seen)


async def test_the_audit_stream_refuses_deletes_and_purges(admin_bus: EventBus) -> None:
    log = AuditLog(lambda: admin_bus.js, admin_bus.subjects)
    seq = await log.append(promoted("digits", 1, cause="trained-1"))
    stream = admin_bus.subjects.audit_stream
    with pytest.raises(APIError, match=r"(?i)delete"):
        await admin_bus.js.delete_msg(stream, seq)
    with pytest.raises(APIError, match=r"(?i)purge"):
        await admin_bus.js.purge_stream(stream)
    assert [s for s, _ in await log.history("digits")] == [seq]


async def test_the_registry_user_may_append_and_read(service_settings: Callable[..., Settings]) -> None:
    async with EventBus(service_settings("registry")) as registry:
        log = AuditLog(lambda: registry.js, registry.subjects)
        entry = promoted("digits", 1, cause="trained-1")
        seq = await log.append(entry)
        assert await log.history("digits") == [(seq, entry)]
