"""The registry's CLI commands: ``conveyor models``, ``promote``, ``rollback``, ``route``, ``audit`` and
``canary-verdict``.

The first five go through the registry's admin API (``CONVEYOR_REGISTRY_URL``, bearer token
``CONVEYOR_ADMIN_TOKEN``), so the registry stays the only writer of aliases, tags, routing and the audit log;
``canary-verdict`` stands in for the monitor and sends ``canary.verdict`` on the bus.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from contracts.events import CanaryVerdict
from contracts.names import ModelRef
from services.runtime.bus import NatsUnreachable, publish_once
from services.runtime.config import Settings

__all__ = [
    "audit_command",
    "canary_verdict_command",
    "models_command",
    "promote_command",
    "rollback_command",
    "route_command",
]

console = Console()
err = Console(stderr=True)
HTTP_TIMEOUT_S = 30.0
NONE = "-"


class StageName(StrEnum):
    """The stages ``promote --to`` accepts (``contracts.kv.STAGES``)."""

    candidate = "candidate"
    staging = "staging"
    canary = "canary"
    champion = "champion"
    shadow = "shadow"


class Verdict(StrEnum):
    passed = "pass"
    failed = "fail"


# ---- helpers ---------------------------------------------------------------------------------------------


def _usage_error(message: str) -> NoReturn:
    err.print(f"[red]{escape(message)}[/]")
    raise typer.Exit(2)


def _parse(text: str, *, version: bool) -> ModelRef:
    """``MODEL`` (``version=False``) or ``MODEL@N`` (``version=True``), else exit 2 saying what to write."""
    try:
        ref = ModelRef.parse(text)
    except ValueError as exc:
        _usage_error(str(exc))
    if version and ref.version is None:
        _usage_error(f"name the version: write {ref.name}@N (`conveyor models {ref.name}` lists them)")
    if not version and ref.version is not None:
        _usage_error(f"name the model only: write {ref.name}, not {text}")
    return ref


def _call(
    settings: Settings,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One admin API request; on any failure print why to stderr and exit 1."""
    base = settings.registry_url.rstrip("/")
    headers = {
        "Authorization": f"Bearer {settings.admin_token.get_secret_value()}",
        "X-Conveyor-User": getpass.getuser(),
        "X-Request-Id": uuid.uuid4().hex,
    }
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=HTTP_TIMEOUT_S) as client:
            response = client.request(method, path, json=body, params=params)
    except httpx.ConnectError as exc:
        err.print(f"[red]cannot reach the registry at {escape(base)}[/]: is the stack up? Try `conveyor up`")
        raise typer.Exit(1) from exc
    except httpx.TimeoutException as exc:
        err.print(f"[red]the registry at {escape(base)} did not answer within {HTTP_TIMEOUT_S:.0f} s[/]")
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        err.print(f"[red]request to the registry at {escape(base)} failed[/]: {escape(str(exc))}")
        raise typer.Exit(1) from exc
    if response.is_success:
        result: dict[str, Any] = response.json()
        return result
    try:
        doc = response.json()
    except ValueError:
        doc = None
    doc = doc if isinstance(doc, dict) else {}
    error = (
        doc.get("error") or response.reason_phrase.lower().replace(" ", "_") or f"http_{response.status_code}"
    )
    detail = doc.get("detail") if doc.get("detail") is not None else response.text.strip()
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    err.print(f"[red]{escape(str(error))}[/]: {escape(detail)}")
    if response.status_code == 401:
        err.print(
            "hint: the CLI sends CONVEYOR_ADMIN_TOKEN (the embedded stack's is in .conveyor/secrets.json); "
            "it must match the registry's"
        )
    raise typer.Exit(1)


def _v(version: object) -> str:
    return NONE if version is None else f"@{version}"


def _rollout_line(rollout: dict[str, Any] | None) -> str:
    """``active @2 · canary @3 at 20% · shadow -`` for a RolloutState as JSON."""
    r = rollout or {}
    canary = r.get("canary_version")
    canary_text = f"{_v(canary)} at {r.get('canary_weight', 0)}%" if canary is not None else NONE
    return (
        f"active {_v(r.get('active_version'))} · canary {canary_text} · shadow {_v(r.get('shadow_version'))}"
    )


def _change(entry: dict[str, Any]) -> str:
    """What an audit entry changed, e.g. ``staging → canary`` or ``champion → - (rolled back)``."""
    if entry.get("kind") == "rollout":
        return f"route: {_rollout_line(entry.get('rollout'))}"
    text = f"{entry.get('from_stage') or NONE} → {entry.get('to_stage') or NONE}"
    if entry.get("kind") == "rejection":
        text = f"rejected ({text})"
    replaced = entry.get("replaced_version")
    if entry.get("kind") == "rollback":
        text += f" (rolled back from @{replaced})" if replaced is not None else " (rolled back)"
    elif replaced is not None:
        text += f" (replaced @{replaced})"
    return text


def _report(answer: dict[str, Any], unchanged: str) -> None:
    """One line for a POST's answer: what changed, the audit seq and the events sent."""
    if not answer.get("changed"):
        console.print(f"nothing to change: {unchanged}")
        return
    entry = answer.get("entry") or {}
    who = entry.get("model", "")
    if entry.get("version") is not None and entry.get("kind") != "rollout":
        who += f"@{entry['version']}"
    line = f"{who}: {_change(entry)} (audit #{answer.get('transition')})"
    if answer.get("rollout") and entry.get("kind") != "rollout":
        line += f"; routing {_rollout_line(answer['rollout'])}"
    events = answer.get("events") or []
    line += f"; {', '.join(events)} sent" if events else "; no event sent"
    console.print(escape(line))


def _fmt_time(value: str | None) -> str:
    if not value:
        return NONE
    try:
        return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def _fmt_metric(value: float | None) -> str:
    return NONE if value is None else f"{value:.4f}"


def _print_model(doc: dict[str, Any]) -> None:
    table = Table(
        "version",
        "aliases",
        "tags",
        "dataset",
        "gates",
        "test acc",
        "macro F1",
        title=f"[bold]{escape(doc['model'])}[/]",
        title_justify="left",
    )
    gates = {True: "[green]passed[/]", False: "[red]failed[/]", None: NONE}
    for v in doc.get("versions", []):
        table.add_row(
            str(v["version"]),
            escape(", ".join(v.get("aliases") or [])) or NONE,
            escape(", ".join(v.get("tags") or [])) or NONE,
            escape(v.get("dataset") or NONE),
            gates.get(v.get("gates_passed"), NONE),
            _fmt_metric(v.get("test_accuracy")),
            _fmt_metric(v.get("test_macro_f1")),
        )
    console.print(table)
    console.print(f"rollout: {escape(_rollout_line(doc.get('rollout')))}")


# ---- commands --------------------------------------------------------------------------------------------


def models_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def models(
        model: Annotated[
            str | None, typer.Argument(help="a model name; without it every registered model is shown")
        ] = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="print the registry's JSON instead of tables")
        ] = False,
    ) -> None:
        """List the registered models: versions, aliases, tags, gates, test metrics and rollout state.

        For each version: its aliases, state tags (rejected, retired), dataset, whether it passed its gates,
        test accuracy and macro F1; then the routing (active version, canary at its weight, shadow).
        """
        names = [_parse(model, version=False).name] if model else None
        settings = settings_factory()
        if names is None:
            names = _call(settings, "GET", "/v1/models").get("models", [])
        docs = [_call(settings, "GET", f"/v1/models/{name}") for name in names]
        if as_json:
            print(json.dumps(docs[0] if model else {"models": docs}, indent=2))
            return
        if not docs:
            console.print("no models registered yet: `conveyor train DATASET` trains one")
            return
        for doc in docs:
            _print_model(doc)

    return models


def promote_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def promote(
        ref: Annotated[
            str, typer.Argument(metavar="MODEL@N", help="the model version to move (the version is required)")
        ],
        to: Annotated[
            StageName, typer.Option("--to", help="the stage to move the version to", case_sensitive=False)
        ],
        reason: Annotated[str, typer.Option("--reason", help="why, for the audit log (required)")],
    ) -> None:
        """Move a model version to a stage, through the registry's admin API.

        The registry checks the transition is legal and skips no stage the policy requires; the change is
        written to the audit log and announced (model.promoted).
        """
        parsed = _parse(ref, version=True)
        if not reason.strip():
            _usage_error("--reason must not be empty: say why, for the audit log")
        answer = _call(
            settings_factory(),
            "POST",
            f"/v1/models/{parsed.name}/promote",
            body={"version": parsed.version, "to": to.value, "reason": reason},
        )
        _report(answer, f"{parsed} already holds {to.value}")

    return promote


def rollback_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def rollback(
        model: Annotated[str, typer.Argument(help="the model whose champion (or canary) to roll back")],
        reason: Annotated[str, typer.Option("--reason", help="why, for the audit log (required)")],
        canary: Annotated[
            bool,
            typer.Option(
                "--canary",
                help="roll back the canary (it loses its aliases and traffic) instead of the champion",
            ),
        ] = False,
    ) -> None:
        """Roll the champion back to the previous champion, or drop the canary (--canary).

        The previous champion is the one the audit log names; the version rolled back from is tagged
        rejected, so nothing promotes it again by accident.
        """
        name = _parse(model, version=False).name
        if not reason.strip():
            _usage_error("--reason must not be empty: say why, for the audit log")
        stage = "canary" if canary else "champion"
        answer = _call(
            settings_factory(),
            "POST",
            f"/v1/models/{name}/rollback",
            body={"stage": stage, "reason": reason},
        )
        _report(answer, f"{name} has nothing to roll back at {stage}")

    return rollback


def route_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def route(
        model: Annotated[str, typer.Argument(help="the model whose traffic to route")],
        reason: Annotated[str, typer.Option("--reason", help="why, for the audit log (required)")],
        blue_green: Annotated[
            int | None,
            typer.Option("--blue-green", metavar="N", min=1, help="switch all traffic to version N"),
        ] = None,
        canary: Annotated[
            int | None,
            typer.Option(
                "--canary", metavar="N", min=1, help="send --weight percent of traffic to version N"
            ),
        ] = None,
        weight: Annotated[
            int | None,
            typer.Option(
                "--weight",
                metavar="W",
                min=1,
                max=100,
                help="canary percent, 1-100 (with --canary only; required)",
            ),
        ] = None,
        shadow: Annotated[
            int | None,
            typer.Option(
                "--shadow", metavar="N", min=1, help="mirror each request to version N (answers unused)"
            ),
        ] = None,
        clear: Annotated[bool, typer.Option("--clear", help="remove the canary and the shadow")] = False,
    ) -> None:
        """Route a model's traffic by hand: blue/green switch, canary, shadow, or clear.

        Give exactly one of --blue-green N, --canary N --weight W, --shadow N or --clear. Routing changes no
        aliases; the change is written to the audit log.
        """
        name = _parse(model, version=False).name
        chosen = {
            "blue_green": blue_green,
            "canary": canary,
            "shadow": shadow,
            "clear": True if clear else None,
        }
        picked = [kind for kind, value in chosen.items() if value is not None]
        if len(picked) != 1:
            given = ", ".join("--" + k.replace("_", "-") for k in picked)
            _usage_error(
                "choose exactly one of --blue-green N, --canary N --weight W, --shadow N or --clear"
                + (f" (given: {given})" if given else "")
            )
        kind = picked[0]
        if kind == "canary" and weight is None:
            _usage_error("--canary N needs --weight W: the percent of traffic (1-100) the canary gets")
        if kind != "canary" and weight is not None:
            _usage_error("--weight goes with --canary only")
        if not reason.strip():
            _usage_error("--reason must not be empty: say why, for the audit log")
        version = None if kind == "clear" else chosen[kind]
        answer = _call(
            settings_factory(),
            "POST",
            f"/v1/models/{name}/route",
            body={"kind": kind, "version": version, "weight": weight, "reason": reason},
        )
        _report(answer, f"{name} is already routed that way")

    return route


def audit_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def audit(
        model: Annotated[str, typer.Argument(help="the model whose audit log to show")],
        limit: Annotated[int, typer.Option("--limit", min=0, help="the newest N entries (0: all)")] = 50,
        as_json: Annotated[bool, typer.Option("--json", help="print the registry's JSON")] = False,
    ) -> None:
        """Show a model's audit log: who changed what, when and why.

        Every transition, rejection, rollback and route change, oldest first, with the names of the gates a
        rejected version failed.
        """
        name = _parse(model, version=False).name
        doc = _call(
            settings_factory(),
            "GET",
            f"/v1/models/{name}/audit",
            params={"limit": limit} if limit else None,
        )
        if as_json:
            print(json.dumps(doc, indent=2))
            return
        entries = doc.get("entries", [])
        if not entries:
            console.print(f"no audit entries for {name}")
            return
        table = Table("seq", "time (UTC)", "actor", "kind", "version", "change", "reason")
        for e in entries:
            reason = e.get("reason") or ""
            failed = [g["name"] for g in e.get("gate_report") or [] if not g.get("passed")]
            if failed:
                reason += f"\nfailed gates: {', '.join(failed)}"
            table.add_row(
                str(e.get("seq")),
                _fmt_time(e.get("time")),
                escape(e.get("actor") or NONE),
                e.get("kind") or NONE,
                NONE if e.get("version") is None else str(e["version"]),
                escape(_change(e)),
                escape(reason),
            )
        console.print(table)

    return audit


def canary_verdict_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def canary_verdict(
        ref: Annotated[str, typer.Argument(metavar="MODEL@N", help="the canary version judged")],
        verdict: Annotated[Verdict, typer.Argument(help="pass (step up or promote) or fail (roll back)")],
        weight: Annotated[
            int | None,
            typer.Option(
                "--weight",
                min=0,
                max=100,
                help="the canary's weight during the judged step (default: its current weight, read from the "
                "registry)",
            ),
        ] = None,
        requests: Annotated[int, typer.Option("--requests", min=0, help="canary requests judged")] = 0,
        reason: Annotated[str | None, typer.Option("--reason", help="why, for the audit log")] = None,
    ) -> None:
        """Judge a canary step by hand, standing in for the monitor (sends canary.verdict).

        On pass the registry steps the canary up or promotes it; on fail it rolls the canary back. Without
        --weight the canary's current weight is read from the registry.
        """
        parsed = _parse(ref, version=True)
        assert parsed.version is not None
        if weight is None:
            doc = _call(settings_factory(), "GET", f"/v1/models/{parsed.name}")
            rollout = doc.get("rollout") or {}
            current = rollout.get("canary_version")
            if current != parsed.version:
                now = (
                    f"the canary is {parsed.name}@{current} at {rollout.get('canary_weight', 0)}%"
                    if current is not None
                    else f"{parsed.name} has no canary"
                )
                err.print(f"[red]{escape(str(parsed))} is not the canary[/]: {escape(now)}")
                raise typer.Exit(1)
            weight = int(rollout.get("canary_weight", 0))
        user = getpass.getuser()
        event = CanaryVerdict(
            model=parsed.name,
            version=parsed.version,
            champion_version=None,
            weight=weight,
            verdict=verdict.value,
            requests=requests,
            checks=[],
            reason=reason or f"given by hand by {user} (conveyor canary-verdict)",
        )

        try:
            ack = asyncio.run(publish_once(settings_factory(), event))
        except NatsUnreachable as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from exc
        if ack.duplicate:
            console.print(
                f"a canary.verdict for {parsed} at {weight}% was sent already: the bus dropped this one "
                f"as a duplicate; `conveyor audit {parsed.name}` shows what the registry did"
            )
            return
        console.print(
            f"canary.verdict {verdict.value} sent for {parsed} at {weight}% ({requests} requests); "
            f"`conveyor audit {parsed.name}` shows what the registry does with it"
        )

    return canary_verdict
