"""Ingest's CLI commands: ``conveyor upload DIR --dataset NAME`` and ``conveyor datasets [NAME[@N]]``.

``upload`` goes through the S3 API like any user's ``mc cp`` would; ``datasets`` reads the
``dataset.versioned`` events (ingest's announcements), so neither touches ingest's state behind its back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer
from minio import Minio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from contracts.events import DatasetVersioned
from contracts.names import ModelRef, validate_name
from services.runtime.bus import NatsUnreachable
from services.runtime.config import Settings
from services.runtime.s3 import s3_client
from services.runtime.versions import read_versions

__all__ = ["datasets_command", "upload_command", "upload_dir"]

console = Console()
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def imagefolder_files(root: Path) -> list[tuple[str, Path]]:
    """(``<label>/<file>``, path) for every file two levels down; other files are not uploaded."""
    return sorted(
        (f"{path.parent.name}/{path.name}", path)
        for path in root.glob("*/*")
        if path.is_file() and not path.name.startswith(".")
    )


def upload_dir(
    client: Minio,
    root: Path,
    dataset: str,
    bucket: str = "incoming",
    on_done: Callable[[int], None] | None = None,
    workers: int = 8,
) -> int:
    """Upload an ImageFolder (``<label>/<file>``) to ``<bucket>/<dataset>/<label>/<file>``; the file count."""
    files = imagefolder_files(root)

    def put(item: tuple[str, Path]) -> None:
        key, path = item
        client.fput_object(bucket, f"{dataset}/{key}", str(path))
        if on_done:
            on_done(path.stat().st_size)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, files))
    return len(files)


def upload_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def upload(
        directory: Path = typer.Argument(
            ..., exists=True, file_okay=False, help="an ImageFolder: <label>/<file>"
        ),
        dataset: str = typer.Option(..., "--dataset", "-d", help="dataset name, e.g. digits"),
        bucket: str = typer.Option("incoming", help="the bucket ingest watches"),
    ) -> None:
        """Upload a local ImageFolder to the incoming bucket through the S3 API; ingest versions it."""
        try:
            validate_name(dataset)
        except ValueError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from exc
        files = imagefolder_files(directory)
        if not files:
            console.print(f"[red]no files in {directory}/<label>/<file>[/]: expected an ImageFolder layout")
            raise typer.Exit(2)
        unknown = sorted({p.suffix.lower() for _, p in files} - IMAGE_SUFFIXES)
        if unknown:
            console.print(
                f"[yellow]files with {', '.join(unknown)} will be uploaded and then rejected by ingest[/]"
            )
        client = s3_client(settings_factory())
        columns = (TextColumn("uploading"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("upload", total=len(files))
            count = upload_dir(client, directory, dataset, bucket, lambda _: progress.advance(task))
        console.print(
            f"uploaded {count} files to s3://{bucket}/{dataset}/ — ingest versions them after a quiet "
            "moment; `conveyor datasets` or `conveyor events tail` shows the version"
        )

    return upload


def datasets_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def datasets(
        ref: str = typer.Argument(None, help="NAME to list its versions, NAME@N to show one"),
        as_json: bool = typer.Option(False, "--json", help="print the dataset.versioned events as JSON"),
    ) -> None:
        """List datasets and their versions, or show one version: labels, splits, lineage."""
        parsed = ModelRef.parse(ref) if ref else None
        try:
            versions = asyncio.run(read_versions(settings_factory(), parsed.name if parsed else "*"))
        except NatsUnreachable as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from exc
        except Exception as exc:
            console.print(
                f"[red]cannot read the versions[/]: {exc!r}\nIs the stack up? Try `conveyor status`."
            )
            raise typer.Exit(1) from exc
        if parsed and parsed.version is not None:
            versions = [v for v in versions if v.version == parsed.version]
        if as_json:
            for v in versions:
                print(v.model_dump_json())
            return
        if not versions:
            console.print(
                f"no versions of {ref}" if ref else "no datasets yet: `conveyor upload DIR --dataset NAME`"
            )
            raise typer.Exit(1 if ref else 0)
        if parsed and parsed.version is not None:
            show_version(versions[-1])
            return
        table = Table(
            "dataset", "version", "files", "labels", "train/val/test", "added", "removed", "rejected"
        )
        for v in versions:
            s = v.split_counts
            table.add_row(
                v.dataset,
                str(v.version),
                str(sum(v.label_counts.values())),
                str(len(v.label_counts)),
                f"{s.train}/{s.val}/{s.test}",
                str(v.added),
                str(v.removed),
                str(v.rejected),
            )
        console.print(table)

    return datasets


def show_version(v: DatasetVersioned) -> None:
    console.print(
        f"[bold]{v.dataset}@{v.version}[/]  {sum(v.label_counts.values())} files, {v.total_bytes:,} bytes"
    )
    console.print(f"  git rev   {v.git_rev}   ({v.repo_url}, tag {v.dataset}/v{v.version})")
    console.print(f"  dvc md5   {v.dvc_md5}   (remote {v.remote_url})")
    s = v.split_counts
    console.print(f"  splits    train {s.train} · val {s.val} · test {s.test}")
    console.print(
        f"  changes   +{v.added} -{v.removed}, {v.rejected} rejected, ingest {v.ingest_seconds:.1f} s"
    )
    console.print("  labels    " + ", ".join(f"{k}: {n}" for k, n in v.label_counts.items()))
    for dup in v.duplicates:
        console.print(
            f"  [yellow]duplicate[/] {dup.md5} under different labels, left out: {', '.join(dup.keys)}"
        )
    console.print(f"  sources   sha256 {v.source_digest} (over each source object's key and etag)")
