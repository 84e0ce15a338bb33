"""The trainer's CLI commands: ``conveyor train DATASET[@N]`` and ``conveyor lineage MODEL@N``.

``train`` sends ``train.requested`` (the trainer stays the only writer of runs and model versions);
``lineage`` reads MLflow and the data repository, writing nothing.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console

from contracts.events import TrainRequested
from contracts.names import ModelRef, validate_name
from services.runtime.bus import NatsUnreachable, publish_once
from services.runtime.config import Settings
from services.runtime.datasets import read_manifest

__all__ = ["lineage_command", "train_command"]

console = Console()


def train_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def train(
        ref: str = typer.Argument(..., help="DATASET or DATASET@N (no @N: the newest version)"),
        model: str = typer.Option(None, help="the model to train (default: every model that trains on it)"),
        reason: str = typer.Option(None, help="why, for the audit trail"),
    ) -> None:
        """Ask the trainer to train on a dataset version, whatever the model's training trigger."""
        try:
            parsed = ModelRef.parse(ref)
            if model:
                validate_name(model)
        except ValueError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from exc
        event = TrainRequested(
            dataset=parsed.name,
            version=parsed.version,
            model=model,
            request_id=uuid.uuid4().hex,
            requested_by=getpass.getuser(),
            reason=reason,
        )

        try:
            asyncio.run(publish_once(settings_factory(), event))
        except NatsUnreachable as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from exc
        console.print(
            f"asked for a training on {ref} (request {event.request_id}); "
            "`conveyor events tail 'conveyor.model.>'` shows model.trained when it is done"
        )

    return train


def lineage_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def lineage(
        ref: str = typer.Argument(..., help="MODEL@N (no @N: the newest version)"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
        limit: int = typer.Option(10, help="source objects to list (0: all)"),
    ) -> None:
        """Walk back from a model version to its dataset version, git rev, DVC md5 and source objects."""
        from mlflow.exceptions import MlflowException

        from services.trainer.tracking import MlflowTracker, fail_fast

        settings = settings_factory()
        parsed = ModelRef.parse(ref)
        tracker = MlflowTracker(settings.mlflow_url)
        try:
            with fail_fast():
                found = (
                    tracker.get_version(parsed.name, parsed.version)
                    if parsed.version
                    else tracker.latest_version(parsed.name)
                )
                run = tracker.client.get_run(found.run_id) if found else None
        except MlflowException as exc:
            console.print(
                f"[red]cannot read MLflow at {settings.mlflow_url}[/]: {exc.message[:300]}\n"
                "Is the stack up? `conveyor status` says."
            )
            raise typer.Exit(1) from exc
        if found is None or run is None:
            console.print(f"[red]no model version {ref}[/]: `conveyor models` lists them")
            raise typer.Exit(1)
        tags = run.data.tags
        dataset, version = tags["conveyor.dataset.name"], int(tags["conveyor.dataset.version"])
        repo_url = tags["conveyor.dataset.repo_url"]
        rev, md5, manifest = read_manifest(
            repo_url, dataset, version, Path(settings.state_dir) / "cli" / "cache"
        )
        sources = sorted((f["source_key"], f["etag"]) for f in manifest["files"])
        doc = {
            "model": found.model,
            "version": found.version,
            "run_id": found.run_id,
            "dataset": f"{dataset}@{version}",
            "git_rev": rev,
            "dvc_md5": md5,
            "repo_url": repo_url,
            "code_version": tags.get("conveyor.code_version"),
            "sources": [{"key": k, "etag": e} for k, e in sources],
        }
        if as_json:
            print(json.dumps(doc, indent=2))
            return
        console.print(f"[bold]{found.model}@{found.version}[/]  MLflow run {found.run_id}")
        console.print(f"  trained on  {dataset}@{version}  (code {doc['code_version']})")
        console.print(f"  git rev     {rev}  in {repo_url}, tag {dataset}/v{version}")
        console.print(f"  dvc md5     {md5}")
        console.print(f"  sources     {len(sources)} objects in the incoming bucket:")
        for key, etag in sources[: limit or None]:
            console.print(f"              {key}  (etag {etag})")
        if limit and len(sources) > limit:
            console.print(
                f"              ... {len(sources) - limit} more (--limit 0 lists all, --json for scripts)"
            )

    return lineage
