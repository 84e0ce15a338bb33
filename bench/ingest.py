"""Ingest benchmark, on its own nats-server and rclone S3; prints one JSON line.

(a) time from the last upload to ``dataset.versioned``, minus the quiet window and the poll interval, for
    1,000 small images and for one 200 MB 16-bit TIFF (target <= 5 s for the 1,000 files);
(b) hashing throughput of the versioning step (``storage.copy_hashing``, which hashes while it writes the
    download) against ``md5sum`` on the same data, measured side by side (target >= 0.8x).

Run: ``.venv/bin/python bench/ingest.py`` (``make bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.events import DatasetVersioned
from deploy.local.natsconf import ADMIN_USER
from services.ingest.app import build
from services.ingest.cli import upload_dir
from services.ingest.config import IngestSettings
from services.ingest.storage import CHUNK, copy_hashing
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.consumer import Delivery
from tests import images
from tests.servers import run_nats, run_s3


def progress(stage: str) -> None:
    print(f"bench/ingest.py: {stage} ...", file=sys.stderr, flush=True)


def chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def hashing(files: list[Path], rounds: int = 3) -> dict[str, float]:
    """Best of ``rounds`` for md5sum and for the versioning step's hashing, on the same (cached) files."""
    total = sum(f.stat().st_size for f in files)
    for f in files:  # warm the page cache for both
        f.read_bytes()
    md5sum = min(
        _timed(lambda: subprocess.run(["md5sum", *map(str, files)], check=True, capture_output=True))
        for _ in range(rounds)
    )
    with tempfile.TemporaryDirectory() as tmp:

        def step_once() -> None:  # each file to a new file of its own, as the versioning step downloads
            folder = Path(tempfile.mkdtemp(dir=tmp))
            for index, f in enumerate(files):
                copy_hashing(chunks(f), folder / f"{index:06d}", 1 << 40)

        step = min(_timed(step_once) for _ in range(rounds))
        only_hash = min(
            _timed(lambda: [copy_hashing(chunks(f), Path("/dev/null"), 1 << 40) for f in files])
            for _ in range(rounds)
        )
    mb = total / 1e6
    return {
        "hash_data_mb": round(mb, 1),
        "md5sum_mb_per_s": round(mb / md5sum),
        "versioning_step_mb_per_s": round(mb / step),
        "versioning_step_ratio": round(md5sum / step, 3),
        "hash_only_mb_per_s": round(mb / only_hash),
        "hash_only_ratio": round(md5sum / only_hash, 3),
    }


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


async def time_to_version(
    settings: IngestSettings, admin: Settings, folder: Path, dataset: str, s3: Any
) -> float:
    """Seconds from the last file uploaded to its dataset.versioned, minus quiet window and poll interval."""
    arrived: asyncio.Queue[float] = asyncio.Queue()

    async def on_versioned(event: DatasetVersioned, _: Delivery) -> None:
        if event.dataset == dataset:
            arrived.put_nowait(time.perf_counter())

    watcher = EventBus(admin)
    watcher.consume(DatasetVersioned, on_versioned, durable=f"bench-{dataset}")
    async with watcher:
        await asyncio.to_thread(upload_dir, s3.client(), folder, dataset, settings.incoming_bucket)
        last_upload = time.perf_counter()
        versioned = await asyncio.wait_for(arrived.get(), 600)
    return versioned - last_upload - settings.ingest_quiet_window_s - settings.ingest_poll_interval_s


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        small = tmp / "small"
        images.write_imagefolder(small, images.digits_images(args.files))
        big = tmp / "big"
        (big / "cells").mkdir(parents=True)
        (big / "cells" / "plate-1.tif").write_bytes(images.large_tiff16(10_000, 10_000))

        progress("hashing: md5sum vs the versioning step, same files")
        figures: dict[str, Any] = hashing([*sorted(small.glob("*/*")), big / "cells" / "plate-1.tif"])

        with run_nats(tmp / "nats") as nats_server, run_s3(tmp / "s3") as s3:
            settings = IngestSettings(
                subject_prefix="bench",
                state_dir=tmp / "state",
                nats_url=nats_server.url,
                nats_user="ingest",
                nats_password=nats_server.passwords["ingest"],
                s3_endpoint=s3.endpoint,
                s3_access_key=s3.access_key,
                s3_secret_key=s3.secret_key,
            )
            admin = Settings(
                service="bench",
                subject_prefix="bench",
                nats_url=nats_server.url,
                nats_user=ADMIN_USER,
                nats_password=nats_server.passwords[ADMIN_USER],
            )
            await nats_server.provision("bench")
            app, _ = build(settings)
            async with app:
                progress(f"{args.files} small images: upload -> dataset.versioned")
                figures["small_files"] = args.files
                figures["small_seconds"] = round(
                    await time_to_version(settings, admin, small, "digits", s3), 2
                )
                progress("one 200 MB 16-bit TIFF: upload -> dataset.versioned")
                figures["tiff_200mb_seconds"] = round(
                    await time_to_version(settings, admin, big, "cells", s3), 2
                )
            figures["quiet_window_s"] = settings.ingest_quiet_window_s
            figures["poll_interval_s"] = settings.ingest_poll_interval_s
    figures["targets"] = {"small_seconds": 5.0, "versioning_step_ratio": 0.8}
    return {"bench": "ingest", **figures}


if __name__ == "__main__":
    # The service logs go to stderr with the progress lines; stdout carries the one JSON line.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=1000, help="small images in the first measurement")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
