"""``conveyor demo`` (``make demo``): the whole loop on scikit-learn's digits.

Start the stack, render the digits (shipped inside scikit-learn, no download) to PNG files, upload them to
the incoming bucket like a user would, show ingest turning them into a dataset version, the trainer turning
that into a registered model, the registry gating it into the first champion, serving loading it into
Triton, and the champion answering predictions through the gateway. Then the closed loop
(``deploy.local.loop``): drifted traffic, ``drift.detected``, feedback labels, a retrained version, its
canary judged by the monitor, and the new champion.
"""

from __future__ import annotations

import asyncio
import functools
import io
import time
from pathlib import Path
from typing import Any

import nats
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from contracts.envelope import Event, decode
from contracts.events import (
    CanaryVerdict,
    DatasetVersioned,
    DriftDetected,
    ModelDeployed,
    ModelDeployFailed,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
    ModelTrained,
    ModelTrainingFailed,
)
from deploy.local.config import StackSettings
from deploy.local.loop import closed_loop
from services.ingest.cli import show_version, upload_dir
from services.runtime.s3 import s3_client
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


class Watcher:
    """Collects this demo's events for digits: dataset.versioned, model.trained or .training_failed,
    model.promoted or .rejected, model.deployed or .deploy_failed, drift.detected, canary.verdict and
    model.rolled_back."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.nc: nats.NATS | None = None

    async def start(self) -> None:
        self.nc = await nats.connect(**self.settings.nats_connect_kwargs())
        kinds = (DatasetVersioned, ModelTrained, ModelTrainingFailed, ModelPromoted, ModelRejected)
        for cls in (*kinds, ModelDeployed, ModelDeployFailed, DriftDetected, CanaryVerdict, ModelRolledBack):
            # Every name, filtered in _got: a plain subscription to one literal subject would let any
            # user's push consumer deliver there (deploy.local.natsconf).
            subject = self.settings.subjects.event_filter(cls.type)
            await self.nc.subscribe(subject, cb=functools.partial(self._got, cls))
        await self.nc.flush()

    async def _got(self, cls: type[Event], msg: Any) -> None:
        if msg.subject == self.settings.subjects.event(cls.type, DATASET):
            self.queue.put_nowait(decode(msg.data, cls)[1])

    async def next(self, kinds: tuple[type[Event], ...], timeout: float) -> Event | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = await asyncio.wait_for(self.queue.get(), left)
            except TimeoutError:
                return None
            if isinstance(event, kinds):
                return event
        return None

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


def run_demo(settings: StackSettings, console: Console) -> None:
    folder = write_digits(settings.state_dir / "demo" / DATASET)
    before = asyncio.run(read_versions(settings, DATASET))
    loop = asyncio.new_event_loop()
    watcher = Watcher(settings)
    loop.run_until_complete(watcher.start())  # subscribed before the first file lands
    try:
        _demo(settings, console, folder, before, loop, watcher)
    finally:
        loop.run_until_complete(watcher.close())
        loop.close()


def _demo(
    settings: StackSettings,
    console: Console,
    folder: Path,
    before: list[DatasetVersioned],
    loop: asyncio.AbstractEventLoop,
    watcher: Watcher,
) -> None:
    console.print(f"\n[bold]1. Upload[/] scikit-learn's digits ({folder}) to s3://incoming/{DATASET}/")
    files = sorted(folder.glob("*/*.png"))
    started = time.monotonic()
    with Progress(TextColumn("   uploading"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
        task = progress.add_task("upload", total=len(files))
        upload_dir(s3_client(settings), folder, DATASET, on_done=lambda _: progress.advance(task))

    console.print(
        "[bold]2. Ingest[/] checks every file, versions the batch with DVC, pushes it, announces it"
    )
    with console.status("   waiting for dataset.versioned ..."):
        got = loop.run_until_complete(watcher.next((DatasetVersioned,), 120 if not before else 20))
    if got is None and before:
        console.print(
            f"   no new version: the same files are already {DATASET}@{before[-1].version} "
            "(the same content never makes a new version, so nothing is trained again either). "
            "To watch the whole loop again from the start: `conveyor down && rm -rf .conveyor && make demo`"
        )
        show_version(before[-1])
        return _next(settings, console)
    if not isinstance(got, DatasetVersioned):
        console.print("   [red]no version after 2 minutes[/]: see .conveyor/logs/ingest.log")
        return None
    console.print(f"   versioned {time.monotonic() - started:.1f} s after the upload started")
    show_version(got)

    console.print("[bold]3. Train[/] on exactly that version, export the model, register it in MLflow")
    with console.status("   waiting for model.trained ..."):
        trained = loop.run_until_complete(watcher.next((ModelTrained, ModelTrainingFailed), 600))
    if isinstance(trained, ModelTrainingFailed):
        console.print(f"   [red]training failed[/] ({trained.reason_code}): {trained.reason}")
    elif isinstance(trained, ModelTrained):
        m = trained.metrics
        console.print(
            f"   {trained.model}@{trained.version} registered as candidate, trained in "
            f"{trained.training_seconds:.1f} s on {trained.device}: test accuracy {m.test_accuracy:.3f}, "
            f"macro F1 {m.test_macro_f1:.3f}"
        )
        console.print(f"   artifacts: {', '.join(sorted(trained.artifacts))}")
        console.print(
            f"   `conveyor lineage {trained.model}@{trained.version}` walks back to the uploaded files"
        )
        _gated(console, loop, watcher, trained, settings)
    else:
        console.print("   [red]no model after 10 minutes[/]: see .conveyor/logs/trainer.log")
    return _next(settings, console)


def _gated(
    console: Console,
    loop: asyncio.AbstractEventLoop,
    watcher: Watcher,
    trained: ModelTrained,
    settings: StackSettings,
) -> None:
    console.print("[bold]4. Gate[/] the candidate: thresholds, champion vs challenger, smoke load, latency")
    with console.status("   waiting for model.promoted or model.rejected ..."):
        decided = loop.run_until_complete(watcher.next((ModelPromoted, ModelRejected), 180))
    ref = f"{trained.model}@{trained.version}"
    if isinstance(decided, ModelRejected):
        console.print(f"   [yellow]{ref} rejected[/]: {decided.reason}")
    elif isinstance(decided, ModelPromoted):
        console.print(
            f"   {ref}: {decided.from_stage or 'candidate'} → [bold]{decided.to_stage}[/] ({decided.reason})"
        )
        for gate in decided.gate_report:
            console.print(f"     [green]✓[/] {gate.name}: {gate.detail}")
        if decided.to_stage == "champion" and _served(console, loop, watcher, settings, decided):
            console.print(
                f"   {ref} is the first champion. `conveyor models {trained.model}` and "
                f"`conveyor audit {trained.model}` show it"
            )
            folder = settings.state_dir / "demo" / DATASET

            def wait_for(kinds: tuple[type[Event], ...], timeout: float) -> Event | None:
                return loop.run_until_complete(watcher.next(kinds, timeout))

            if closed_loop(settings, console, folder, wait_for, trained.model):
                console.print(
                    "   [green]the loop closed[/]: drift → feedback labels → new dataset version → retrained "
                    f"model → canary → champion. `conveyor audit {trained.model}` lists every step"
                )
        else:
            console.print(f"   a champion exists already: {ref} rolls out through staging and a canary")
    else:
        console.print("   [red]no decision after 3 minutes[/]: see .conveyor/logs/registry.log")


def _served(
    console: Console,
    loop: asyncio.AbstractEventLoop,
    watcher: Watcher,
    settings: StackSettings,
    promoted: ModelPromoted,
) -> bool:
    console.print("[bold]5. Serve[/]: verify the files, write the Triton repository, load, smoke-test")
    with console.status("   waiting for model.deployed ..."):
        deployed = loop.run_until_complete(watcher.next((ModelDeployed, ModelDeployFailed), 240))
    if isinstance(deployed, ModelDeployFailed):
        console.print(f"   [red]deploy failed[/] ({deployed.reason_code}): {deployed.reason}")
        return False
    if not isinstance(deployed, ModelDeployed):
        console.print("   [red]not deployed after 4 minutes[/]: see .conveyor/logs/serving.log")
        return False
    console.print(
        f"   {deployed.model}@{deployed.version} loaded in Triton ({deployed.backend} backend) in "
        f"{deployed.load_seconds:.1f} s; smoke inference {deployed.smoke_latency_ms or 0:.1f} ms"
    )
    console.print(f"[bold]6. Predict[/] through the gateway ({settings.gateway_url})")
    from services.serving.cli import predict_files

    folder = settings.state_dir / "demo" / DATASET
    picks = [sorted((folder / str(digit)).glob("*.png"))[-1] for digit in range(10)]
    response = None
    for _ in range(40):  # the gateway follows the rollout state within a moment
        response = predict_files(settings.gateway_url, promoted.model, picks, key="demo")
        if response.status_code != 503:
            break
        time.sleep(0.5)
    if response is None or response.status_code != 200:
        detail = response.text if response is not None else "no answer"
        console.print(f"   [red]the gateway did not answer[/]: {detail}")
        return False
    doc = response.json()
    right = 0
    for path, p in zip(picks, doc["predictions"], strict=True):
        truth = path.parent.name
        right += p["label"] == truth
        mark = "[green]✓[/]" if p["label"] == truth else "[red]✗[/]"
        console.print(f"     {mark} {truth}/{path.name} → {p['label']} ({p['confidence']:.3f})")
    console.print(
        f"   {right}/10 right, answered by {promoted.model}@{doc['version']} ({doc['route']}). "
        f"`conveyor predict {promoted.model} IMAGE...` does the same"
    )
    return True


def _next(settings: StackSettings, console: Console) -> None:
    console.print(
        "\n[bold]Next[/]: `conveyor datasets`, `conveyor models`, `conveyor events tail`, MLflow at "
        f"{settings.mlflow_url}, `conveyor drift digits`."
    )
