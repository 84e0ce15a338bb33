"""The monitor's CLI command: ``conveyor drift MODEL`` (reads the monitor's and the trainer's KV state,
writes nothing), and ``attention()``, the per-model lines ``conveyor status`` adds (drifting versions, labels
needed).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import typer
from nats.js import JetStreamContext
from rich.console import Console
from rich.table import Table

from contracts.kv import RolloutState
from contracts.names import Subjects, validate_name
from services.monitor.state import ModelRecord, MonitorState
from services.runtime.bus import NatsUnreachable, connect_once
from services.runtime.config import Settings
from services.runtime.rollouts import Rollouts, routed_versions
from services.trainer.state import ModelState, TrainerState

__all__ = ["attention", "drift_command"]

console = Console()
err = Console(stderr=True)


async def _read(js: JetStreamContext, subjects: Subjects, model: str) -> tuple[ModelRecord, ModelState]:
    return (
        await MonitorState(lambda: js, subjects.kv.monitor).get(model),
        await TrainerState(lambda: js, subjects.kv.trainer).get(model),
    )


async def attention(js: JetStreamContext, subjects: Subjects) -> list[dict[str, Any]]:
    """Models that need someone: a routed version whose drift is not cleared, or labels a drift asked for."""
    monitor = await MonitorState(lambda: js, subjects.kv.monitor).current()
    trainer = await TrainerState(lambda: js, subjects.kv.trainer).current()
    rollouts = await Rollouts(lambda: js, subjects.kv.rollout).current()
    out = []
    for model in sorted(set(monitor) | set(trainer)):
        record = ModelRecord.model_validate_json(monitor[model]) if monitor.get(model) else None
        state = ModelState(**json.loads(trainer[model])) if trainer.get(model) else ModelState()
        routed = (
            routed_versions(RolloutState.model_validate_json(rollouts[model])) if model in rollouts else set()
        )
        drifting = sorted(
            v
            for v, kept in (record.versions if record else {}).items()
            if kept.drifting_since and v in routed
        )
        if drifting or state.needs_labels:
            since = datetime.fromtimestamp(state.needs_labels_since, UTC) if state.needs_labels else None
            out.append({"model": model, "drifting_versions": drifting, "needs_labels_since": since})
    return out


def drift_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def drift(
        model: str = typer.Argument(..., help="the model, e.g. digits"),
        windows: int = typer.Option(5, "--windows", "-n", min=1, help="closed windows shown per version"),
        as_json: bool = typer.Option(False, "--json", help="print the monitor's whole state of the model"),
    ) -> None:
        """Show a model's latest drift windows, its canary verdicts, and whether it waits for labels.

        Each closed window lists every drift test's statistic, p-value and threshold; after a drift with no
        newer labelled data, the trainer waits for labels (feedback) before it retrains."""
        try:
            validate_name(model)
        except ValueError as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from exc
        s = settings_factory()

        async def read() -> tuple[ModelRecord, ModelState]:
            try:
                nc = await connect_once(s)
            except NatsUnreachable as exc:
                err.print(f"[red]{exc}[/]")
                raise typer.Exit(1) from exc
            try:
                return await _read(nc.jetstream(), s.subjects, model)
            finally:
                await nc.close()

        record, trainer = asyncio.run(read())
        if as_json:
            doc = record.model_dump(mode="json") | {"trainer": trainer.__dict__}
            print(json.dumps(doc, indent=2))
            return
        if not record.versions and not record.verdicts:
            console.print(
                f"no window of {model} has closed yet: the monitor judges a window once it holds the "
                "policy's drift.window_size samples or drift.window_seconds passed (`conveyor policy show "
                f"{model}`); predictions through the gateway are the samples"
            )
        for version, kept in sorted(record.versions.items()):
            _print_version(model, version, kept.windows[-windows:], kept.drifting_since)
        if record.verdicts:
            table = Table(
                "version", "weight", "verdict", "requests", "failed checks", "at", title="canary verdicts"
            )
            for v in record.verdicts:
                failed = ", ".join(f"{c.name} {c.value} > {c.threshold}" for c in v.checks if not c.passed)
                colour = "green" if v.verdict == "pass" else "red"
                table.add_row(
                    str(v.version),
                    f"{v.weight}%",
                    f"[{colour}]{v.verdict}",
                    str(v.requests),
                    failed or "-",
                    f"{v.at:%Y-%m-%d %H:%M:%S}",
                )
            console.print(table)
        if trainer.needs_labels:
            since = datetime.fromtimestamp(trainer.needs_labels_since, UTC)
            console.print(
                f"[yellow]labels needed[/] since {since:%Y-%m-%d %H:%M:%S} UTC: a drift found no labelled "
                "data newer than the model's; send feedback labels "
                f"(POST /v1/models/{model}/feedback) or upload labelled images, and the trainer trains on "
                "the new version"
            )

    return drift


def _print_version(model: str, version: int, windows: list[Any], drifting_since: datetime | None) -> None:
    state = f"[red]drifting since {drifting_since:%H:%M:%S}" if drifting_since else "[green]no open drift"
    console.print(f"[bold]{model}@{version}[/]: {state}[/]")
    table = Table("closed", "samples", "outcome", "accuracy", "drifted tests", box=None)
    for w in windows:
        drifted = ", ".join(f"{t.name} {t.statistic:g}" for t in w.tests if t.drifted) or w.detail or "-"
        colour = {"drift": "red", "clear": "green"}.get(w.outcome, "yellow")
        accuracy = f"{w.live_accuracy:.3f} ({w.feedback})" if w.live_accuracy is not None else "-"
        outcome = f"{w.outcome} ({w.severity})" if w.severity else w.outcome
        table.add_row(f"{w.closed_at:%H:%M:%S}", str(w.samples), f"[{colour}]{outcome}", accuracy, drifted)
    console.print(table)
    if windows and windows[-1].tests:
        tests = Table("test", "statistic", "p-value", "threshold", "drifted", title="latest window", box=None)
        for t in windows[-1].tests:
            p_value = "-" if t.p_value is None else f"{t.p_value:.3g}"
            tests.add_row(
                t.name, f"{t.statistic:.4g}", p_value, f"{t.threshold:.3g}", "yes" if t.drifted else "no"
            )
        console.print(tests)
