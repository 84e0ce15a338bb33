"""`conveyor events tail`, `dlq list|replay` and `policy apply|show` against a real nats-server, and what
the commands say when NATS is not there or refuses them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from contracts.events import ModelTrained
from contracts.examples import example_event
from deploy.local.natsconf import ADMIN_USER
from deploy.local.parts import free_port
from services.runtime.bus import EventBus
from services.runtime.consumer import Delivery
from services.runtime.errors import PermanentError
from tests.servers import run_nats

pytestmark = pytest.mark.integration

CONVEYOR = [sys.executable, "-m", "deploy.local.cli"]


@pytest.fixture
def conveyor(
    nats_server: Any, prefix: str, tmp_path: Path
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the `conveyor` CLI as the admin user on this test's prefix, outside any embedded stack."""
    base = os.environ | {
        "CONVEYOR_NATS_URL": nats_server.url,
        "CONVEYOR_NATS_USER": ADMIN_USER,
        "CONVEYOR_NATS_PASSWORD": nats_server.passwords[ADMIN_USER],
        "CONVEYOR_SUBJECT_PREFIX": prefix,
        "CONVEYOR_STATE_DIR": str(tmp_path / "state"),
        "COLUMNS": "200",
    }

    def run(
        *args: str, timeout: float = 30, env: dict[str, str] | None = None, background: bool = False
    ) -> Any:
        """The finished command, or with ``background`` the running one (stderr into stdout)."""
        full = base | (env or {})
        if background:
            return subprocess.Popen(
                [*CONVEYOR, *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        return subprocess.run([*CONVEYOR, *args], env=full, capture_output=True, text=True, timeout=timeout)

    return run


async def test_dead_letter_listed_and_replayed_through_the_cli(service_settings, admin_bus, conveyor):
    handled: list[int] = []
    broken = True

    async def handler(event: ModelTrained, delivery: Delivery) -> None:
        if broken:
            raise PermanentError(f"no dataset for {event.model}@{event.version}")
        handled.append(event.version)

    registry = EventBus(service_settings("registry"))
    registry.consume(ModelTrained, handler)
    async with registry, EventBus(service_settings("trainer")) as trainer:
        await trainer.publish(example_event(ModelTrained))
        listed: list[dict[str, Any]] = []
        for _ in range(50):
            out = await asyncio.to_thread(conveyor, "dlq", "list", "--json")
            assert out.returncode == 0, out.stderr
            listed = [json.loads(line) for line in out.stdout.splitlines()]
            if listed:
                break
            await asyncio.sleep(0.1)
        [letter] = listed
        assert letter["kind"] == "permanent" and "no dataset for digits@1" in letter["reason"]

        table = await asyncio.to_thread(conveyor, "dlq", "list")
        assert "no dataset for digits@1" in table.stdout and "registry" in table.stdout

        broken = False
        replayed = await asyncio.to_thread(conveyor, "dlq", "replay", str(letter["id"]))
        assert replayed.returncode == 0, replayed.stderr
        assert f"replayed dead letter {letter['id']}" in replayed.stdout
        for _ in range(100):
            if handled:
                break
            await asyncio.sleep(0.05)
    assert handled == [1]
    assert (await asyncio.to_thread(conveyor, "dlq", "list")).stdout.strip().startswith("no dead letters")
    missing = await asyncio.to_thread(conveyor, "dlq", "replay", str(letter["id"]))
    assert missing.returncode == 2 and "no dead letter" in missing.stdout


@pytest.mark.parametrize("literal", [False, True])
async def test_events_tail_prints_events_live(service_settings, admin_bus, conveyor, prefix, literal):
    """Every event by default; with one literal subject (listened to through a wildcard), only its own."""
    args = ("events", "tail", "--json", "--count", "1")
    if literal:
        args += (f"{prefix}.model.trained.digits",)
    tail = asyncio.create_task(asyncio.to_thread(conveyor, *args))
    published = set()
    async with EventBus(service_settings("trainer")) as trainer:
        # It shows what is published once it has subscribed: publish until it has shown one (however long
        # the CLI takes to start on a busy machine); with the literal subject, a "cells" event before each.
        for version in range(1, 120):
            if tail.done():
                break
            event = example_event(ModelTrained).model_copy(update={"version": version})
            if literal:
                await trainer.publish(event.model_copy(update={"model": "cells"}))
            await trainer.publish(event)
            published.add(event.event_id())
            await asyncio.sleep(0.25)
    out = await asyncio.wait_for(tail, 30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["type"] == "model.trained" and doc["subject"] == "digits"
    assert doc["id"] in published


async def test_policy_apply_then_show(admin_bus, conveyor, tmp_path):
    policy = tmp_path / "digits.yaml"
    policy.write_text("model: digits\ntraining:\n  trigger: on_drift\n")
    before = await asyncio.to_thread(conveyor, "policy", "show", "digits")
    assert before.returncode == 0 and "no policy applied" in before.stdout
    applied = await asyncio.to_thread(conveyor, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr
    assert "applied policy for digits (revision" in applied.stdout
    shown = await asyncio.to_thread(conveyor, "policy", "show", "digits")
    assert "trigger: on_drift" in shown.stdout and "# revision" in shown.stdout
    entry = await (await admin_bus.js.key_value(admin_bus.subjects.kv.policy)).get("digits")
    assert b'"trigger":"on_drift"' in (entry.value or b"")


def test_policy_apply_refuses_an_invalid_file_and_says_why(conveyor, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: Digits!\ntraining:\n  trigger: sometimes\n")
    out = conveyor("policy", "apply", str(bad))
    assert out.returncode == 2
    assert "invalid name 'Digits!'" in out.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["datasets"],
        ["events", "tail"],
        ["dlq", "list"],
        ["policy", "show", "digits"],
        ["drift", "digits"],
        ["train", "digits"],
        ["streams"],
    ],
)
def test_a_command_says_at_once_that_nats_is_not_there(conveyor, command):
    """nats-py's default would retry forever (and ``max_reconnect_attempts=0`` means that too), logging a
    traceback each time: a command tries once and says what to do next."""
    nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    began = time.monotonic()
    result = conveyor(*command, env={"CONVEYOR_NATS_URL": nowhere})
    assert result.returncode == 1, result.stdout + result.stderr
    said = " ".join((result.stdout + result.stderr).split())
    assert f"cannot reach NATS at {nowhere}" in said and "Try `conveyor up`" in said, said
    assert "Traceback" not in said
    print(f"{command}: {time.monotonic() - began:.1f} s")  # a subprocess with its imports; was forever


def test_a_refused_login_is_named_and_events_tail_ends_when_nats_goes(conveyor, tmp_path):
    result = conveyor("dlq", "list", env={"CONVEYOR_NATS_PASSWORD": "not-the-password"})
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1 and f"it refused the user {ADMIN_USER!r}" in said, said
    assert "Traceback" not in said
    # a command's connection does not reconnect: tail says so when its NATS stops, rather than hang
    with run_nats(tmp_path / "own-nats") as own:
        tail = conveyor(
            "events",
            "tail",
            env={"CONVEYOR_NATS_URL": own.url, "CONVEYOR_NATS_PASSWORD": own.passwords[ADMIN_USER]},
            background=True,
        )
        assert tail.stdout is not None
        assert "listening on" in tail.stdout.readline()
    out, _ = tail.communicate(timeout=30)
    assert tail.returncode == 1 and "NATS closed the connection" in " ".join(out.split()), out
