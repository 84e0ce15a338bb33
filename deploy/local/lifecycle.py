"""Start and stop the embedded stack from the CLI: preflight checks, the detached supervisor, a clean stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from deploy.local.builders import stack_servers
from deploy.local.config import StackSettings
from deploy.local.parts import PartError, check_binary, check_ports, stop_process
from deploy.local.secrets import LocalSecrets
from deploy.local.services import STACK_SERVICES, service_part
from deploy.local.state import pid_alive, read_json, running_supervisor

__all__ = ["StopReport", "preflight", "spawn_supervisor", "stop_stack"]


def preflight(settings: StackSettings, secrets: LocalSecrets) -> list[str]:
    """Every problem that would stop a part from starting (missing binary, taken port); empty when none."""
    parts = stack_servers(settings, secrets)
    parts += [service_part(s, settings, secrets, threads=1, experiment_id=None) for s in STACK_SERVICES]
    problems = []
    for part in parts:
        for check in (check_binary, lambda p: check_ports(p, settings.host)):
            try:
                check(part)
            except PartError as exc:
                problems.append(str(exc))
    return problems


def spawn_supervisor(settings: StackSettings) -> subprocess.Popen[bytes]:
    """Start ``python -m deploy.local.supervisor`` detached from this terminal (its own session).

    Its own output (tracebacks included) goes to ``logs/supervisor.out``; it writes ``run/stack.json``.
    """
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    settings.state_file.unlink(missing_ok=True)
    env = {**os.environ, "CONVEYOR_STATE_DIR": str(settings.state_dir)}
    with (settings.logs_dir / "supervisor.out").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "deploy.local.supervisor"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass
class StopReport:
    """What ``stop_stack`` found and did."""

    supervisor_pid: int | None
    stopped: list[str]  # "nats (pid 123)"
    killed_supervisor: bool = False
    orphans: int = 0


def _live_parts(state: dict[str, Any] | None) -> list[dict[str, Any]]:
    parts = (state or {}).get("parts", [])
    return [p for p in parts if pid_alive(p.get("pid"), p.get("identity"))]


def stop_stack(settings: StackSettings) -> StopReport:
    """SIGTERM the supervisor and wait while it stops its children; then stop any process it left behind.

    Leftovers happen only when the supervisor itself was killed; they are found through ``stack.json`` and
    stopped only when their pid still belongs to the same process.
    """
    supervisor = running_supervisor(settings.pid_file)
    live = _live_parts(read_json(settings.state_file))
    report = StopReport(supervisor, [f"{p['name']} (pid {p['pid']})" for p in live])
    if supervisor is not None:
        identity = (read_json(settings.pid_file) or {}).get("identity")
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + settings.stop_timeout_s * (len(live) + 1) + 5
        while pid_alive(supervisor, identity) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(supervisor, identity):
            report.killed_supervisor = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGKILL)
    for part in _live_parts(read_json(settings.state_file)):
        report.orphans += 1
        stop_process(int(part["pid"]), settings.stop_timeout_s)
    settings.pid_file.unlink(missing_ok=True)
    return report
