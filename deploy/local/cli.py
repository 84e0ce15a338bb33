"""The ``conveyor`` command: the embedded stack (up, down, status, logs, demo), the bus (events, dlq,
policy) and each service's own commands (upload, datasets, train, lineage, models, promote, rollback, route,
audit, canary-verdict)."""

from __future__ import annotations

import inspect
import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deploy.local.buscli import dlq_app, events_app, policy_app, streams_command
from deploy.local.buscli import settings as bus_settings
from deploy.local.config import StackSettings
from deploy.local.demo import run_demo
from deploy.local.lifecycle import preflight, spawn_supervisor, stop_stack
from deploy.local.logs import LEVELS, follow, last_lines, log_files, render
from deploy.local.parts import tail
from deploy.local.secrets import LocalSecrets
from deploy.local.services import STACK_SERVICES
from deploy.local.state import read_json, running_supervisor
from deploy.local.status import collect_status
from services.ingest.cli import datasets_command, upload_command
from services.monitor.cli import drift_command
from services.registry.cli import (
    audit_command,
    canary_verdict_command,
    models_command,
    promote_command,
    rollback_command,
    route_command,
)
from services.serving.cli import predict_command
from services.trainer.cli import lineage_command, train_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="conveyor",
    help="Conveyor: an event-driven MLOps loop. `conveyor up` starts the embedded stack (NATS JetStream, "
    "an S3 store, MLflow, Triton and the services) with its state under .conveyor/ (CONVEYOR_STATE_DIR).",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(events_app, name="events", help="Watch the events on the bus.")
app.add_typer(dlq_app, name="dlq", help="Dead letters: list them with their reasons, replay one.")
app.add_typer(policy_app, name="policy", help="Per-model policy: apply a YAML file, show a model's policy.")
app.command("streams")(streams_command)
# Each service's own commands (services/<svc>/cli.py), assembled here.
app.command("upload")(upload_command(bus_settings))
app.command("datasets")(datasets_command(bus_settings))
app.command("train")(train_command(bus_settings))
app.command("lineage")(lineage_command(bus_settings))
app.command("predict")(predict_command(bus_settings))
app.command("models")(models_command(bus_settings))
app.command("promote")(promote_command(bus_settings))
app.command("rollback")(rollback_command(bus_settings))
app.command("route")(route_command(bus_settings))
app.command("audit")(audit_command(bus_settings))
app.command("canary-verdict")(canary_verdict_command(bus_settings))
app.command("drift")(drift_command(bus_settings))


def _unwrap_help(group: typer.Typer) -> None:
    """Each command's docstring with its paragraphs on one line each: Typer keeps the line breaks of every
    paragraph after the first, which then break mid-sentence in ``--help``."""
    for command in group.registered_commands:
        doc = command.help or inspect.getdoc(command.callback)
        if doc:
            command.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _unwrap_help(sub.typer_instance)


console = Console()
err = Console(stderr=True)
ICONS = {"healthy": "[green]✓ healthy", "failed": "[red]✗ failed", "pending": "[dim]· waiting"}


def _progress_table(state: dict[str, Any] | None, elapsed: float) -> Table:
    table = Table(title=f"conveyor up ({elapsed:.1f} s)", title_justify="left", box=None)
    for column in ("part", "status", "ports", "ready in"):
        table.add_column(column)
    for part in (state or {}).get("parts", []):
        status = part.get("status", "pending")
        ports = ", ".join(str(p) for p in (part.get("ports") or {}).values())
        ready = f"{part['healthy_after_s']:.1f} s" if part.get("healthy_after_s") is not None else ""
        table.add_row(part["name"], ICONS.get(status, f"[yellow]… {status}"), ports, ready)
    return table


def _fail_up(settings: StackSettings, state: dict[str, Any] | None, reason: str) -> None:
    """Explain a failed start with the failing part's log tail, stop what started, exit 1."""
    parts = (state or {}).get("parts", [])
    failed = next((p for p in parts if p.get("status") == "failed"), None)
    failed = failed or next((p for p in parts if p.get("status") == "starting"), None)
    err.print(f"[red bold]conveyor up failed:[/] {reason}")
    log = settings.logs_dir / "supervisor.out"
    if failed:
        log = settings.logs_dir / f"{failed['name']}.log"
    elif not tail(log):
        log = settings.logs_dir / "supervisor.log"
    if text := tail(log, 25):
        err.print(f"--- last lines of {log} ---", markup=False)
        err.print(text, markup=False, highlight=False)
    report = stop_stack(settings)
    if report.stopped:
        err.print(f"stopped what had started: {', '.join(report.stopped)}")
    err.print(
        "What to do: fix the cause shown above and run `conveyor up` again; "
        f"every part logs to {settings.logs_dir}/; `conveyor up --foreground` shows the supervisor live."
    )
    raise typer.Exit(1)


def _start(settings: StackSettings, timeout: float | None, quiet: bool = False) -> None:
    pid = running_supervisor(settings.pid_file)
    if pid is not None:
        err.print(
            f"Conveyor is already running (supervisor pid {pid}, state in {settings.state_dir}). "
            "See `conveyor status`, or stop it with `conveyor down` first."
        )
        raise typer.Exit(1)
    secrets = LocalSecrets.load_or_create(settings.state_dir)
    if problems := preflight(settings.with_secrets(secrets), secrets):
        err.print("[red bold]conveyor up cannot start:[/]")
        for problem in problems:
            err.print(f"  • {problem}", markup=False)
        raise typer.Exit(2)
    start, timeout = time.monotonic(), timeout or settings.up_timeout_s
    proc = spawn_supervisor(settings)
    state: dict[str, Any] | None = None
    with Live(_progress_table(None, 0), console=console, refresh_per_second=8, transient=quiet) as live:
        while True:
            elapsed = time.monotonic() - start
            state = read_json(settings.state_file)
            live.update(_progress_table(state, elapsed))
            status = (state or {}).get("status")
            if status == "running":
                break
            if status in ("failed", "stopping", "stopped"):
                live.stop()
                _fail_up(settings, state, (state or {}).get("error") or f"the stack is {status}")
            if proc.poll() is not None:
                live.stop()
                _fail_up(settings, state, f"the supervisor exited with code {proc.returncode}")
            if elapsed > timeout:
                live.stop()
                _fail_up(settings, state, f"not healthy after {timeout:.0f} s (CONVEYOR_UP_TIMEOUT_S)")
            time.sleep(0.1)
    took = time.monotonic() - start
    if not console.is_terminal:
        console.print()
    console.print(f"[green bold]Conveyor is up[/] in {took:.1f} s (supervisor pid {proc.pid}).")
    console.print(
        f"NATS {settings.nats_url} · S3 {settings.s3_endpoint} · MLflow {settings.mlflow_url} · "
        f"Triton {settings.triton_url} — `conveyor status` for details, `conveyor down` to stop."
    )


@app.command()
def up(
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Run the supervisor in this terminal (Ctrl-C stops it).")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds to wait for every part to be healthy (CONVEYOR_UP_TIMEOUT_S)."),
    ] = None,
) -> None:
    """Start the embedded stack: nats-server, S3 (rclone), MLflow, Triton, then the services.

    Checks binaries and ports first, then waits until every part is healthy, showing progress. The data stays
    under the state dir (.conveyor/, or CONVEYOR_STATE_DIR) across `down`/`up`; each port is configurable
    (CONVEYOR_NATS_PORT, CONVEYOR_S3_PORT, CONVEYOR_MLFLOW_PORT, CONVEYOR_TRITON_HTTP_PORT, ...).
    """
    settings = StackSettings()
    if foreground:
        from deploy.local.supervisor import run_supervisor

        if running_supervisor(settings.pid_file) is not None:
            err.print("Conveyor is already running: `conveyor down` first.")
            raise typer.Exit(1)
        secrets = LocalSecrets.load_or_create(settings.state_dir)
        if problems := preflight(settings.with_secrets(secrets), secrets):
            err.print("\n".join(["conveyor up cannot start:", *problems]), markup=False)
            raise typer.Exit(2)
        raise typer.Exit(run_supervisor(settings, echo=True))
    _start(settings, timeout)


@app.command()
def down() -> None:
    """Stop the embedded stack: the services side by side, then the servers, and wait for them."""
    settings = StackSettings()
    report = stop_stack(settings)
    if report.supervisor_pid is None and not report.orphans:
        console.print(f"Conveyor is not running (state dir {settings.state_dir}); nothing to stop.")
        return
    stopped = ", ".join(report.stopped) or "no running parts"
    console.print(f"Stopped the supervisor (pid {report.supervisor_pid}) and: {stopped}.")
    if report.killed_supervisor:
        console.print("[yellow]The supervisor did not stop in time and was killed.")
    if report.orphans:
        console.print(f"[yellow]Stopped {report.orphans} process(es) that had outlived their supervisor.")
    console.print(f"The data stays in {settings.state_dir}; `conveyor up` starts it again.")


def _print_status(status: dict[str, Any]) -> None:
    if not status["running"]:
        console.print("Conveyor is [bold]not running[/]. Start it with `conveyor up`.")
        return
    head = "[green]healthy" if status["healthy"] else f"[red]{status['stack']}"
    console.print(
        f"Conveyor: {head}[/] (supervisor pid {status['supervisor_pid']}, up in {status['up_seconds']} s)"
    )
    parts = Table("part", "pid", "health", "restarts", "ports", "checks", box=None)
    for p in status["parts"]:
        health = "[green]healthy" if p["healthy"] else f"[red]{p.get('status')}"
        ports = ", ".join(str(v) for v in (p.get("ports") or {}).values())
        parts.add_row(
            p["name"], str(p.get("pid") or "-"), health, str(p.get("restarts", 0)), ports, p.get("health")
        )
    console.print(parts)
    js = status["jetstream"]
    if not js["ok"]:
        console.print(f"[red]JetStream unreachable: {js.get('error')}")
        return
    streams = Table("stream", "messages", "consumer", "pending", "ack pending", "redelivered", box=None)
    for s in js["streams"]:
        streams.add_row(s["name"], str(s["messages"]), "", "", "", "")
        for c in s["consumers"]:
            streams.add_row(
                "", "", c["name"], str(c["pending"]), str(c["ack_pending"]), str(c["redelivered"])
            )
    console.print(streams)
    if js["dead_letters"] is None:
        console.print("dead letters: no DLQ stream")
    elif js["dead_letters"]:
        per_service = ", ".join(f"{s} {n}" for s, n in sorted(js.get("dead_letters_by_service", {}).items()))
        console.print(f"dead letters: {js['dead_letters']} ({per_service}) — `conveyor dlq list` shows why")
    else:
        console.print("dead letters: 0")
    for m in js.get("attention", []):
        if m["drifting_versions"]:
            versions = ", ".join(str(v) for v in m["drifting_versions"])
            console.print(
                f"[yellow]{m['model']}[/]: drifting (version {versions}) — `conveyor drift {m['model']}`"
            )
        if m["needs_labels_since"]:
            console.print(
                f"[yellow]{m['model']}[/]: labels needed since {m['needs_labels_since']:%Y-%m-%d %H:%M} UTC "
                "(a drift found no newer labelled data) — send feedback labels or upload labelled images"
            )


@app.command()
def status(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON, with every endpoint and the local credentials.")
    ] = False,
) -> None:
    """Show each process and server's health, JetStream streams with consumer lag, and the dead-letter count.

    Exits 1 when the stack is not running or not healthy. `--json` adds every endpoint (NATS, S3 with its
    local keys, MLflow, Triton, gateway) for scripts and integrators.
    """
    result = collect_status(StackSettings())
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        _print_status(result)
    if not result["healthy"]:
        raise typer.Exit(1)


@app.command()
def logs(
    parts: Annotated[
        list[str] | None,
        typer.Argument(
            help="Parts to show (ingest, trainer, ..., gateway, nats, mlflow, triton, supervisor); "
            "default: the services.",
            show_default=False,
        ),
    ] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many of the last lines.")] = 40,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Then keep printing new lines.")] = False,
    level: Annotated[
        str | None,
        typer.Option(
            help=f"Only JSON lines at this level or above ({', '.join(LEVELS)}); leaves out the "
            "servers' own lines."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the lines as written.")] = False,
) -> None:
    """Show the parts' logs from .conveyor/logs/, merged by time: `conveyor logs trainer -f`.

    A service's JSON lines become `time part level event key=value`; a server's lines are shown as they are.
    Works whether the stack is up or not; the files themselves are .conveyor/logs/<part>.log (rotated at
    10 MB into <part>.log.1 ... .3)."""
    settings = StackSettings()
    files = log_files(settings.logs_dir)
    wanted = parts or [s.name for s in STACK_SERVICES if s.name in files]
    if level is not None and level.lower() not in LEVELS:
        err.print(f"--level {level!r}: one of {', '.join(LEVELS)}", markup=False)
        raise typer.Exit(2)
    if unknown := [p for p in wanted if p not in files]:
        known = ", ".join(files) or f"none: {settings.logs_dir} holds no log (has `conveyor up` run here?)"
        err.print(f"no log for {', '.join(unknown)}; the parts with logs: {known}", markup=False)
        raise typer.Exit(2)
    chosen = {p: files[p] for p in wanted}
    threshold = level.lower() if level else None
    width = max(map(len, chosen))

    def show(line: Any) -> None:
        if as_json:
            typer.echo(line.text)
        else:
            console.print(render(line, width), highlight=False, soft_wrap=True)

    for line in last_lines(chosen, lines, threshold):
        show(line)
    if follow_:
        try:
            for line in follow(chosen, threshold):
                show(line)
        except KeyboardInterrupt:
            pass


@app.command()
def demo() -> None:
    """Start the stack if needed and run the whole loop on scikit-learn's digits (a few minutes).

    Upload, dataset version, training, gates, deployment, predictions through the gateway, drift, feedback
    labels, retraining, and the canary that makes the new version champion."""
    settings = StackSettings()
    if running_supervisor(settings.pid_file) is None:
        _start(settings, None)
    result = collect_status(settings)
    _print_status(result)
    run_demo(settings.with_secrets(LocalSecrets.load_or_create(settings.state_dir)), console)
    console.print("`conveyor down` stops everything; the data stays for the next `conveyor up`.")


_unwrap_help(app)  # last: every command is registered by now


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
