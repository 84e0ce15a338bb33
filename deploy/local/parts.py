"""A *part* of the embedded stack as plain data, and the few functions that start, check and stop one.

The supervisor (``conveyor up``) and the test fixtures (``tests/servers.py``) use the same ``Part`` values,
built by ``deploy.local.builders``, so what the tests run is what users run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

__all__ = [
    "HealthCheck",
    "Part",
    "PartError",
    "check_binary",
    "check_ports",
    "find_binary",
    "free_port",
    "port_is_free",
    "spawn",
    "stop_process",
    "stop_processes",
    "tail",
    "wait_healthy",
]


class PartError(RuntimeError):
    """A part cannot start, or did not become healthy; the message names the part and says what to do."""


@dataclass(frozen=True)
class HealthCheck:
    """Healthy when a GET of ``url`` answers 2xx (a service's ``/healthz`` says 204), or (without ``url``)
    when ``host:port`` accepts TCP."""

    url: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None

    def ok(self, timeout: float = 1.0) -> bool:
        """One probe; never raises."""
        try:
            if self.url:
                return httpx.get(self.url, timeout=timeout).is_success
            if self.port is not None:
                with socket.create_connection((self.host, self.port), timeout=timeout):
                    return True
        except (httpx.HTTPError, OSError):
            return False
        return False

    def describe(self) -> str:
        return self.url or f"tcp://{self.host}:{self.port}"


@dataclass
class Part:
    """One process of the stack: how to run it, where it listens and how to tell it is healthy.

    ``ports`` maps the ``StackSettings`` field that configures each port (``nats_port``) to its value, so
    errors can name the variable to change (``CONVEYOR_NATS_PORT``). ``prepare`` creates what the process
    needs on disk (config files, bucket folders) and runs before every start.
    """

    name: str
    argv: list[str]
    health: HealthCheck
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    ready_timeout_s: float = 30.0
    kind: str = "server"  # "server" or "service"
    prepare: Callable[[], None] | None = None
    hint: str = ""  # what to do when the binary is missing

    @property
    def binary(self) -> str:
        return self.argv[0]


def find_binary(name: str) -> str | None:
    """``name`` next to the running Python (the virtualenv's bin), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def check_binary(part: Part) -> None:
    """Raise ``PartError`` when the part's executable is missing."""
    binary = Path(part.binary)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise PartError(f"{part.name}: executable {part.binary!r} not found. {part.hint}".strip())


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (a bind test, so it also sees listeners on 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(part: Part, host: str = "127.0.0.1") -> None:
    """Raise ``PartError`` naming the first taken port of the part and the variable that moves it."""
    for setting, port in part.ports.items():
        if not port_is_free(port, host):
            env = f"CONVEYOR_{setting.upper()}"
            raise PartError(
                f"port {port} ({part.name}) is taken: stop the other server (`ss -ltnp 'sport = :{port}'` "
                f"shows it; `conveyor down` if it is an earlier stack) or set {env}=<free port>"
            )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_PR_SET_PDEATHSIG = 1
try:
    _prctl: Callable[..., int] | None = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):  # not glibc Linux
    _prctl = None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: no locks, no imports, one libc call.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(part: Part, stdout: IO[bytes] | int, *, die_with_parent: bool = True) -> subprocess.Popen[bytes]:
    """Start the part in its own process group (so ``stop_process`` reaches its children too).

    With ``die_with_parent`` the kernel sends it SIGTERM when the spawning thread dies, so a killed
    supervisor or test run leaves no server behind. Spawn from the main thread.
    """
    if part.prepare is not None:
        part.prepare()
    return subprocess.Popen(
        part.argv,
        cwd=part.cwd,
        env={**os.environ, **part.env},
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent if die_with_parent else None,
    )


def wait_healthy(part: Part, proc: subprocess.Popen[bytes], log: Path | None = None) -> float:
    """Block until the part is healthy; return the seconds it took.

    Raises ``PartError`` with the tail of ``log`` when the process exits or the readiness timeout passes.
    """
    start = time.monotonic()
    while True:
        if part.health.ok():
            return time.monotonic() - start
        code = proc.poll()
        waited = time.monotonic() - start
        if code is not None or waited > part.ready_timeout_s:
            why = f"exited with code {code}" if code is not None else f"not healthy after {waited:.0f} s"
            where = f"\n--- last lines of {log} ---\n{tail(log)}" if log else ""
            raise PartError(f"{part.name} {why} ({part.health.describe()}){where}")
        time.sleep(0.1)


def stop_process(pid: int, timeout: float = 15.0) -> bool:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``timeout``; True when it had to kill."""
    return bool(stop_processes([pid], timeout))


def stop_processes(pids: list[int], timeout: float = 15.0) -> set[int]:
    """``stop_process`` for several process groups at once, so they stop side by side; the pids killed."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if _group_alive(pid)}
        if alive:
            time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return alive


def _group_alive(pgid: int) -> bool:
    # Reap the leader when it is our child, so a zombie does not count as alive.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tail(path: Path | None, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
