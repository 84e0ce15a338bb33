"""``conveyor demo`` (``make demo``): the loop as far as it exists, on scikit-learn's digits.

Today: start the stack, render the digits (shipped inside scikit-learn, no download) to PNG files, upload
them to the incoming bucket like a user would, and show ingest turning them into a dataset version.
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import nats
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from contracts.envelope import decode
from contracts.events import DatasetVersioned
from deploy.local.config import StackSettings
from services.ingest.cli import s3_client, show_version, upload_dir
from services.runtime.versions import read_versions

__all__ = ["digit_pngs", "run_demo", "write_digits"]

DATASET = "digits"


def digit_pngs() -> list[tuple[str, str, bytes]]:
    """The 1,797 digits as (label, file name, 32x32 8-bit PNG bytes), labels "0" to "9"."""
    from sklearn.datasets import load_digits  # a second to import; only the demo and tests need it

    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    pixels = pixels.repeat(4, axis=1).repeat(4, axis=2)  # 8x8 -> 32x32, big enough to look at
    out = []
    for index, (image, target) in enumerate(zip(pixels, digits.target, strict=True)):
        buffer = io.BytesIO()
        Image.fromarray(image, "L").save(buffer, format="PNG")
        out.append((str(int(target)), f"digit-{index:04d}.png", buffer.getvalue()))
    return out


def write_digits(root: Path) -> Path:
    """Write the digits as an ImageFolder under ``root`` (once) and return it."""
    if not any(root.glob("*/*.png")):
        for label, name, data in digit_pngs():
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / name).write_bytes(data)
    return root


async def _wait_for_version(settings: StackSettings, timeout: float) -> DatasetVersioned | None:
    nc = await nats.connect(**settings.admin_connect_kwargs())  # type: ignore[arg-type]
    try:
        sub = await nc.subscribe(settings.subjects.event(DatasetVersioned.type, DATASET))
        try:
            msg = await sub.next_msg(timeout=timeout)
        except nats.errors.TimeoutError:
            return None
        return decode(msg.data, DatasetVersioned)[1]
    finally:
        await nc.close()


def run_demo(settings: StackSettings, console: Console) -> None:
    folder = write_digits(settings.state_dir / "demo" / DATASET)
    before = asyncio.run(read_versions(settings, DATASET))
    console.print(f"\n[bold]1. Upload[/] scikit-learn's digits ({folder}) to s3://incoming/{DATASET}/")
    files = sorted(folder.glob("*/*.png"))
    columns = (TextColumn("   uploading"), BarColumn(), MofNCompleteColumn())
    loop = asyncio.new_event_loop()
    waiting = loop.create_task(_wait_for_version(settings, 120 if not before else 20))
    loop.run_until_complete(asyncio.sleep(0.2))  # subscribed before the first file lands
    started = time.monotonic()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("upload", total=len(files))
        upload_dir(s3_client(settings), folder, DATASET, on_done=lambda _: progress.advance(task))
    console.print(
        "[bold]2. Ingest[/] checks every file, versions the batch with DVC, pushes it, announces it"
    )
    with console.status("   waiting for dataset.versioned ..."):
        version = loop.run_until_complete(waiting)
    loop.close()
    if version is None and before:
        console.print(
            f"   no new version: the same files are already {DATASET}@{before[-1].version} "
            "(the same content never makes a new version)"
        )
        version = before[-1]
    elif version is None:
        console.print("   [red]no version after 2 minutes[/]: see .conveyor/logs/ingest.log")
        return
    else:
        console.print(f"   versioned {time.monotonic() - started:.1f} s after the upload started")
    show_version(version)
    console.print(
        "\n[bold]Next[/]: `conveyor datasets`, `conveyor events tail`, MLflow at "
        f"{settings.mlflow_url}. Training, serving and monitoring come with the next issues."
    )
