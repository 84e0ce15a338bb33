"""Bus commands of the CLI: ``conveyor events tail``, ``dlq list|replay``, ``policy apply|show``,
``streams``.

They log in as the admin user: in the embedded stack with the generated credentials of
``<state>/secrets.json``, elsewhere with ``CONVEYOR_NATS_URL``, ``CONVEYOR_NATS_USER`` and
``CONVEYOR_NATS_PASSWORD``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import nats
import typer
import yaml
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from contracts.kv import ModelPolicy, kv_key
from contracts.names import Subjects
from deploy.local.config import StackSettings
from deploy.local.secrets import LocalSecrets
from services.ingest.config import IngestSettings
from services.runtime.bus import NatsUnreachable, connect_once
from services.runtime.deadletters import list_dead_letters, replay
from services.runtime.streams import ensure_streams

__all__ = ["dlq_app", "events_app", "policy_app", "provision", "streams_command"]

events_app = typer.Typer(help="Watch the events on the bus.", no_args_is_help=True)
dlq_app = typer.Typer(
    help="Dead letters: messages a service gave up on, with the reason.", no_args_is_help=True
)
policy_app = typer.Typer(
    help="Per-model policy (training trigger, gates, rollout, sampling).", no_args_is_help=True
)

console = Console()
T = TypeVar("T")


def settings() -> StackSettings:
    s = StackSettings()
    secrets = LocalSecrets.load(s.state_dir)
    return s.with_secrets(secrets) if secrets else s


@asynccontextmanager
async def connect(s: StackSettings) -> AsyncIterator[tuple[nats.NATS, JetStreamContext]]:
    try:
        nc = await connect_once(s)
    except NatsUnreachable as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    try:
        yield nc, nc.jetstream()
    finally:
        await nc.close()


def run(work: Callable[[StackSettings, JetStreamContext, nats.NATS], Awaitable[T]]) -> T:
    async def main() -> T:
        s = settings()
        async with connect(s) as (nc, js):
            return await work(s, js, nc)

    return asyncio.run(main())


# ---- streams --------------------------------------------------------------------------------------------


async def provision(s: StackSettings, js: JetStreamContext) -> list[str]:
    """Create every stream, KV bucket and object store of the install and bring each to its declared
    configuration: the admin user's work (services only check that they exist). With
    ``CONVEYOR_INGEST_TRIGGER=minio`` also the stream of MinIO's notifications, on
    ``CONVEYOR_INGEST_NOTIFY_SUBJECT``."""
    ingest = IngestSettings(subject_prefix=s.subject_prefix)
    return await ensure_streams(
        js,
        s.subjects,
        inference_max_bytes=s.inference_max_bytes,
        inference_max_age_s=s.inference_max_age_s,
        minio_subject=ingest.ingest_notify_subject if ingest.ingest_trigger == "minio" else None,
    )


def streams_command() -> None:
    """Create the streams, KV buckets and object store, or bring them to their configuration (as admin).

    Service users may only check that they exist, so an install runs this before its services start and
    again after changing CONVEYOR_INFERENCE_MAX_BYTES or CONVEYOR_INFERENCE_MAX_AGE_S: `conveyor up` does it
    for the embedded stack, Compose's `streams` service for deploy/compose. With CONVEYOR_INGEST_TRIGGER=minio
    it also makes the stream MinIO's bucket notifications go to (CONVEYOR_INGEST_NOTIFY_SUBJECT).
    """
    for name in run(lambda s, js, nc: provision(s, js)):
        console.print(f"ready: {name}")


# ---- events ---------------------------------------------------------------------------------------------


def summarize(subject: str, data: bytes) -> str:
    """One line for a person: time, type, name, and the event's scalar fields."""
    try:
        doc = json.loads(data)
    except ValueError:
        return f"[yellow]{subject}[/]  (not JSON, {len(data)} bytes)"
    if not isinstance(doc, dict):
        return f"[yellow]{subject}[/]  {doc!r}"
    if "specversion" not in doc:  # a dead letter or another record
        fields = {k: v for k, v in doc.items() if isinstance(v, str | int | float) and k != "payload"}
        return f"[magenta]{subject}[/]  " + "  ".join(f"{k}={v}" for k, v in list(fields.items())[:6])
    payload = doc.get("data") or {}
    scalars = [f"{k}={v}" for k, v in payload.items() if isinstance(v, str | int | float | bool)][:6]
    time = str(doc.get("time", ""))[11:19]
    return f"{time}  [cyan]{doc.get('type')}[/]  [bold]{doc.get('subject')}[/]  " + "  ".join(scalars)


@events_app.command("tail")
def tail(
    subject: str = typer.Argument(
        None, help="subject filter, e.g. 'conveyor.model.>' (default: every event)"
    ),
    raw_json: bool = typer.Option(False, "--json", help="print each message as raw JSON, one per line"),
    count: int = typer.Option(0, help="exit after this many messages (0: until Ctrl-C)"),
) -> None:
    """Print events live as they are published."""

    async def work(s: StackSettings, js: JetStreamContext, nc: nats.NATS) -> None:
        seen = 0
        done = asyncio.Event()
        pattern = subject or Subjects(s.subject_prefix).all_events
        tokens = pattern.split(".")
        # A plain subscription to one literal subject would let any user's push consumer deliver there
        # (see deploy.local.natsconf); a wildcard one does not, so a literal subject is filtered here.
        literal = pattern if "*" not in tokens and ">" not in tokens else None
        listened = ".".join([*tokens[:-1], "*"]) if literal else pattern

        async def show(msg: Any) -> None:
            nonlocal seen
            if msg.subject.startswith(("$", "_INBOX")) or (literal and msg.subject != literal):
                return
            if raw_json:
                print(msg.data.decode(errors="replace"), flush=True)
            else:
                console.print(summarize(msg.subject, msg.data), highlight=False)
            seen += 1
            if count and seen >= count:
                done.set()

        await nc.subscribe(listened, cb=show)
        await nc.flush()
        if not raw_json:
            console.print(f"[dim]listening on {pattern} (Ctrl-C to stop)[/]")
        while not done.is_set():
            if nc.is_closed:  # a command's connection does not reconnect (``connect_once``)
                console.print("[red]NATS closed the connection[/]: `conveyor status` says whether it is up")
                raise typer.Exit(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1)

    try:
        run(work)
    except KeyboardInterrupt:
        pass


# ---- dead letters ---------------------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    limit: int = typer.Option(50, help="show at most this many, newest first"),
    raw_json: bool = typer.Option(False, "--json", help="print JSON lines instead of a table"),
) -> None:
    """Show the dead letters still held, newest first, with the reason each was given up."""

    async def work(s: StackSettings, js: JetStreamContext, nc: nats.NATS) -> list[Any]:
        return await list_dead_letters(js, Subjects(s.subject_prefix), limit)

    letters = run(work)
    if raw_json:
        for letter in letters:
            print(json.dumps({"id": letter.id, **letter.record.model_dump(mode="json")}))
        return
    if not letters:
        console.print("no dead letters")
        return
    table = Table("id", "failed at", "service", "kind", "subject", "tries", "reason")
    for letter in letters:
        r = letter.record
        table.add_row(
            str(letter.id),
            f"{r.failed_at:%Y-%m-%d %H:%M:%S}",
            r.service,
            r.kind,
            r.subject,
            str(r.num_delivered),
            r.reason,
        )
    console.print(table)
    console.print("[dim]`conveyor dlq replay ID` sends one back to its subject once the cause is fixed[/]")


@dlq_app.command("replay")
def dlq_replay(
    dlq_id: int = typer.Argument(..., metavar="ID", help="the id `conveyor dlq list` shows"),
) -> None:
    """Send a dead letter back to its original subject and remove it from the dead letters."""

    async def work(s: StackSettings, js: JetStreamContext, nc: nats.NATS) -> dict[str, Any]:
        return await replay(js, Subjects(s.subject_prefix), dlq_id)

    try:
        result = run(work)
    except LookupError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    console.print(
        f"replayed dead letter {dlq_id} to {result['subject']} "
        f"(stream {result['stream']}, seq {result['seq']})"
    )


# ---- policy ---------------------------------------------------------------------------------------------


def load_policies(path: Path) -> list[ModelPolicy]:
    """A YAML file holding one policy, a list of them, or ``policies: [...]``."""
    doc = yaml.safe_load(path.read_text())
    items = doc.get("policies", [doc]) if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise ValueError("expected a policy mapping (with `model:`), a list of them, or `policies: [...]`")
    return [ModelPolicy.model_validate(item) for item in items]


@policy_app.command("apply")
def policy_apply(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="YAML policy file"),
) -> None:
    """Validate a policy file and store each model's policy (every service reads it from NATS KV)."""
    try:
        policies = load_policies(file)
    except ValidationError as exc:
        console.print(f"[red]{file} is not a valid policy:[/]\n{exc}")
        raise typer.Exit(2) from exc
    except (ValueError, yaml.YAMLError) as exc:
        console.print(f"[red]{file}: {exc}[/]")
        raise typer.Exit(2) from exc

    async def work(s: StackSettings, js: JetStreamContext, nc: nats.NATS) -> list[int]:
        kv = await js.key_value(Subjects(s.subject_prefix).kv.policy)
        return [await kv.put(kv_key(p.model), p.model_dump_json().encode()) for p in policies]

    for policy, revision in zip(policies, run(work), strict=True):
        console.print(f"applied policy for [bold]{policy.model}[/] (revision {revision})")


@policy_app.command("show")
def policy_show(model: str = typer.Argument(..., help="model name")) -> None:
    """Print a model's policy as YAML (the defaults when none was applied)."""

    async def work(s: StackSettings, js: JetStreamContext, nc: nats.NATS) -> tuple[ModelPolicy, int | None]:
        kv = await js.key_value(Subjects(s.subject_prefix).kv.policy)
        try:
            entry = await kv.get(kv_key(model))
        except KeyNotFoundError:
            return ModelPolicy(model=model), None
        return ModelPolicy.model_validate_json(entry.value or b"{}"), entry.revision

    try:
        policy, revision = run(work)
    except ValidationError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    header = f"# revision {revision}" if revision else "# no policy applied: these are the defaults"
    print(header)
    print(yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False), end="")
