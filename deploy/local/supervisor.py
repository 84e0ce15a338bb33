"""The supervisor of the embedded stack, which ``conveyor up`` runs detached (``python -m ...supervisor``).

It starts every part as its own process: the servers (nats, s3, mlflow, triton) side by side; once all are
healthy, the streams and KV buckets and the traces experiment; then the services of
``deploy.local.services.STACK_SERVICES`` side by side. Each child's output goes to a rotated
``<state>/logs/<part>.log``. A crashed child restarts with exponential backoff (reset after a stable run).
``<state>/run/stack.json`` says what runs; SIGTERM stops the services side by side, then the servers side by
side (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from logging.handlers import RotatingFileHandler

import httpx
import nats

from deploy.local.builders import stack_servers
from deploy.local.children import LOG_BACKUPS, LOG_MAX_BYTES, Child, now_iso, rotating_logger
from deploy.local.config import StackSettings
from deploy.local.parts import Part, PartError, stop_processes
from deploy.local.secrets import LocalSecrets
from deploy.local.services import STACK_SERVICES, ServiceSpec, service_part, threads_per_service
from deploy.local.state import process_identity, write_json, write_pid_file

__all__ = ["Supervisor", "main", "run_supervisor"]

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 30.0  # a child that ran this long has its backoff reset
HEALTH_EVERY_S = 5.0

log = logging.getLogger("conveyor.supervisor")


class Supervisor:
    """Starts, watches and stops the parts of one state dir; ``run`` blocks until SIGTERM/SIGINT."""

    def __init__(
        self,
        settings: StackSettings,
        secrets: LocalSecrets,
        services: tuple[ServiceSpec, ...] = STACK_SERVICES,
    ) -> None:
        self.settings, self.secrets, self.services = settings.embedded(), secrets, services
        self.children = [self._child(part) for part in stack_servers(settings, secrets)]
        self.pending_services = list(services)
        self.stopping = threading.Event()
        self.status, self.error = "starting", ""
        self.experiment_id: str | None = None
        self.started = time.monotonic()
        self.up_seconds: float | None = None

    def _child(self, part: Part) -> Child:
        path = self.settings.logs_dir / f"{part.name}.log"
        return Child(part, path, rotating_logger(part.name, path))

    # -- the state file --------------------------------------------------------------------------------
    def write_state(self) -> None:
        parts = [child.as_json() for child in self.children]
        parts += [{"name": s.name, "kind": "service", "status": "pending"} for s in self.pending_services]
        write_json(
            self.settings.state_file,
            {
                "status": self.status,
                "error": self.error or None,
                "supervisor": {"pid": os.getpid(), "identity": process_identity(os.getpid())},
                "updated_at": now_iso(),
                "up_seconds": self.up_seconds,
                "mlflow_experiment_id": self.experiment_id,
                "parts": parts,
            },
        )

    # -- lifecycle -------------------------------------------------------------------------------------
    def run(self) -> int:
        """Start everything, supervise until asked to stop, stop everything; the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        write_pid_file(self.settings.pid_file, os.getpid())
        log.info("supervisor %s starting the stack in %s", os.getpid(), self.settings.state_dir)
        code = 0
        try:
            self._start_all()
            self.status, self.up_seconds = "running", round(time.monotonic() - self.started, 2)
            log.info("stack healthy after %.1f s", self.up_seconds)
            self.write_state()
            while not self.stopping.wait(0.5):
                self._tick()
        except PartError as exc:
            if not self.stopping.is_set():
                self.status, self.error, code = "failed", str(exc), 1
                log.error("%s", exc)
                self.write_state()
        except Exception as exc:  # a bug: say so in the state file, then stop what runs
            log.exception("supervisor failed")
            self.status, self.error, code = (
                "failed",
                f"supervisor error: {exc!r} (see logs/supervisor.log)",
                1,
            )
            self.write_state()
        finally:
            self._stop_all()
        return code

    def _start_all(self) -> None:
        """The servers side by side; once all are healthy, the streams, the traces experiment, and then the
        services side by side (each one's start is mostly imports, which overlap well)."""
        servers = list(self.children)
        self._start_and_wait(servers)
        for child in servers:
            if child.part.name == "nats":
                self._ensure_streams(child)
            elif child.part.name == "mlflow":
                self.experiment_id = self._experiment(child)
        threads = threads_per_service(len(self.services))
        services = [
            self._child(
                service_part(
                    spec, self.settings, self.secrets, threads=threads, experiment_id=self.experiment_id
                )
            )
            for spec in self.pending_services
        ]
        self.children += services
        self.pending_services.clear()
        self._start_and_wait(services)

    def _start_and_wait(self, children: list[Child]) -> None:
        """Start ``children`` together and wait until each is healthy, or raise for the first that exits or
        stays unhealthy past its ``ready_timeout_s``."""
        for child in children:
            try:
                child.start()
            except OSError as exc:
                child.status = "failed"
                raise PartError(f"{child.part.name} could not start: {exc}") from exc
        self.write_state()
        waiting = list(children)
        while waiting:
            for child in list(waiting):
                if child.part.health.ok():
                    child.status, child.healthy_after_s = (
                        "healthy",
                        round(time.monotonic() - child.started, 2),
                    )
                    log.info("%s healthy after %.1f s", child.part.name, child.healthy_after_s)
                    waiting.remove(child)
                    self.write_state()
                    continue
                assert child.proc is not None
                waited = time.monotonic() - child.started
                if child.proc.poll() is not None or waited > child.part.ready_timeout_s:
                    child.status = "failed"
                    child.last_exit = child.proc.poll()
                    why = (
                        f"exited with code {child.last_exit}"
                        if child.last_exit is not None
                        else "did not get healthy"
                    )
                    raise PartError(
                        f"{child.part.name} {why} within {waited:.0f} s ({child.part.health.describe()}); "
                        f"see {child.log_path}"
                    )
            if waiting and self.stopping.wait(0.1):
                raise PartError("stopped while starting")

    def _ensure_streams(self, child: Child) -> None:
        try:
            names = asyncio.run(self._ensure_streams_async())
        except Exception as exc:
            child.status = "failed"
            raise PartError(f"nats: creating the streams and KV buckets failed: {exc!r}") from exc
        child.extra["streams"] = names
        log.info("streams and KV buckets ready: %s", names)

    async def _ensure_streams_async(self) -> list[str]:
        from deploy.local.buscli import provision

        nc = await nats.connect(**self.settings.nats_connect_kwargs(), connect_timeout=5)
        try:
            return await provision(self.settings, nc.jetstream())
        finally:
            await nc.close()

    def _experiment(self, child: Child) -> str:
        """Get or create the experiment that receives the traces (its id goes in the OTLP headers)."""
        name, base = self.settings.mlflow_experiment, f"{self.settings.mlflow_url}/api/2.0/mlflow/experiments"
        try:
            with httpx.Client(timeout=10) as client:
                got = client.get(f"{base}/get-by-name", params={"experiment_name": name})
                if got.status_code == 200:
                    return str(got.json()["experiment"]["experiment_id"])
                created = client.post(f"{base}/create", json={"name": name})
                created.raise_for_status()
                return str(created.json()["experiment_id"])
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            child.status = "failed"
            raise PartError(f"mlflow: could not get or create the experiment {name!r}: {exc!r}") from exc

    def _tick(self) -> None:
        """Restart what crashed (after its backoff) and refresh health; write the state when it changed."""
        before = [(c.status, c.restarts) for c in self.children]
        now = time.monotonic()
        for child in self.children:
            assert child.proc is not None
            if child.status in ("starting", "healthy", "unhealthy") and child.proc.poll() is not None:
                self._schedule_restart(child, now)
            elif child.status == "restarting" and now >= child.next_start:
                child.restarts += 1
                try:
                    child.start()
                except OSError as exc:
                    log.error("%s could not restart: %s", child.part.name, exc)
                    child.next_start = now + BACKOFF_MAX_S
            elif child.status == "starting" or (
                child.status in ("healthy", "unhealthy") and now - child.last_health > HEALTH_EVERY_S
            ):
                child.last_health = now
                healthy = child.part.health.ok()
                child.status = (
                    "healthy" if healthy else ("starting" if child.status == "starting" else "unhealthy")
                )
        if before != [(c.status, c.restarts) for c in self.children]:
            self.write_state()

    @staticmethod
    def _schedule_restart(child: Child, now: float) -> None:
        """Exponential backoff: 1 s, 2 s, 4 s ... up to a minute; back to 1 s after a stable run."""
        assert child.proc is not None
        child.last_exit = child.proc.returncode
        ran = now - child.started
        child.failures = 1 if ran >= STABLE_AFTER_S else child.failures + 1
        delay = min(BACKOFF_BASE_S * 2 ** (child.failures - 1), BACKOFF_MAX_S)
        child.status, child.next_start = "restarting", now + delay
        log.warning(
            "%s exited (%s) after %.0f s; restart in %.0f s", child.part.name, child.last_exit, ran, delay
        )
        child.note("exited", "warning", exit=child.last_exit, ran_s=round(ran, 1), restart_in_s=delay)

    def _stop_all(self) -> None:
        self.status = "stopping"
        self.write_state()
        # The services side by side, then the servers they use side by side.
        for kind in ("service", "server"):
            children = [c for c in self.children if c.part.kind == kind]
            running = [(c, c.proc) for c in children if c.proc is not None and c.proc.poll() is None]
            killed = stop_processes([proc.pid for _, proc in running], self.settings.stop_timeout_s)
            for child, proc in running:
                proc.wait()
                verb = "killed (did not stop in time)" if proc.pid in killed else "stopped"
                log.info("%s %s", child.part.name, verb)
                child.note(verb, "warning" if proc.pid in killed else "info")
            for child in children:
                if child.status != "failed":
                    child.status = "stopped"
        self.status = "stopped"
        self.write_state()
        try:
            self.settings.pid_file.unlink()
        except FileNotFoundError:
            pass
        log.info("supervisor %s stopped", os.getpid())


def run_supervisor(settings: StackSettings | None = None, *, echo: bool = False) -> int:
    """Run the supervisor in this process until SIGTERM/SIGINT; it logs to ``logs/supervisor.log``.

    With ``echo`` (``conveyor up --foreground``) its log goes to stderr as well.
    """
    settings = settings or StackSettings()
    secrets = LocalSecrets.load_or_create(settings.state_dir)
    settings = settings.with_secrets(secrets)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(
        settings.logs_dir / "supervisor.log", maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS
    )
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(formatter)
    log.handlers[:] = [handler]
    if echo:
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.handlers[-1].setFormatter(formatter)
    log.setLevel(logging.INFO)
    log.propagate = False
    return Supervisor(settings, secrets).run()


def main() -> None:
    """Entry point of the detached supervisor (``python -m deploy.local.supervisor``)."""
    sys.exit(run_supervisor())


if __name__ == "__main__":
    main()
