"""How the supervisor tells the CLI what runs: ``run/supervisor.pid`` and ``run/stack.json``.

A pid is stored with the process's start time (``/proc/<pid>/stat``), so a pid reused by another program
after a crash is never mistaken for a part of the stack, and never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "pid_alive",
    "process_identity",
    "read_json",
    "read_pid_file",
    "running_supervisor",
    "write_json",
    "write_pid_file",
]


def process_identity(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its closing parenthesis.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited
        return None
    return int(fields[19])


def pid_alive(pid: int | None, identity: int | None) -> bool:
    """True when ``pid`` still runs and is the same process that was recorded."""
    return pid is not None and identity is not None and process_identity(pid) == identity


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The content of ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_pid_file(path: Path, pid: int) -> None:
    write_json(path, {"pid": pid, "identity": process_identity(pid)})


def read_pid_file(path: Path) -> tuple[int, int | None] | None:
    data = read_json(path)
    if not data or not isinstance(data.get("pid"), int):
        return None
    return data["pid"], data.get("identity")


def running_supervisor(pid_file: Path) -> int | None:
    """The pid of the live supervisor of this state dir, or None (a stale pid file is removed)."""
    recorded = read_pid_file(pid_file)
    if recorded is None:
        return None
    pid, identity = recorded
    if pid_alive(pid, identity):
        return pid
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    return None
