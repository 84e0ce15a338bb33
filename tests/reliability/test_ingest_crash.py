"""SIGKILL ingest in the middle of versioning, restart it: exactly one version, pushed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from contracts.events import DatasetVersioned
from deploy.local.natsconf import ADMIN_USER
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.consumer import Delivery
from tests import images
from tests.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def ingest_env(nats_server: Any, s3_server: Any, prefix: str, state: Path) -> dict[str, str]:
    return os.environ | {
        "CONVEYOR_SERVICE": "ingest",
        "CONVEYOR_SUBJECT_PREFIX": prefix,
        "CONVEYOR_STATE_DIR": str(state),
        "CONVEYOR_NATS_URL": nats_server.url,
        "CONVEYOR_NATS_USER": "ingest",
        "CONVEYOR_NATS_PASSWORD": nats_server.passwords["ingest"],
        "CONVEYOR_S3_ENDPOINT": s3_server.endpoint,
        "CONVEYOR_S3_ACCESS_KEY": s3_server.access_key,
        "CONVEYOR_S3_SECRET_KEY": s3_server.secret_key,
        "CONVEYOR_INCOMING_BUCKET": f"{prefix}-in",
        "CONVEYOR_QUARANTINE_BUCKET": f"{prefix}-q",
        "CONVEYOR_INGEST_QUIET_WINDOW_S": "0.3",
        "CONVEYOR_INGEST_POLL_INTERVAL_S": "0.3",
        "CONVEYOR_HTTP_PORT": str(free_port()),
    }


def local_tags(repo: Path) -> list[str]:
    if not (repo / ".git").exists():
        return []
    out = subprocess.run(["git", "-C", str(repo), "tag", "-l"], capture_output=True, text=True)
    return out.stdout.split()


def remote_tags(remote: Path) -> list[str]:
    out = subprocess.run(["git", "ls-remote", "--tags", str(remote)], capture_output=True, text=True)
    tags = [line.split("refs/tags/", 1)[1] for line in out.stdout.splitlines() if "refs/tags/" in line]
    return [tag for tag in tags if not tag.endswith("^{}")]  # annotated tags list their commit too


def staged_downloads(state: Path) -> int:
    tmp = state / "ingest" / "tmp"
    return sum(1 for _ in tmp.glob("ingest-*/*")) if tmp.exists() else 0


@pytest.mark.parametrize("kill_when", ["downloading", "committed"])
async def test_killed_mid_versioning_gives_exactly_one_pushed_version(
    nats_server, s3_server, prefix, tmp_path, kill_when
):
    state = tmp_path / "state"
    env = ingest_env(nats_server, s3_server, prefix, state)
    client = s3_server.client()
    for bucket in (f"{prefix}-in", f"{prefix}-q"):
        client.make_bucket(bucket)
    items = images.digits_images()[:600]
    images.write_imagefolder(tmp_path / "upload", items)
    from services.ingest.cli import upload_dir

    upload_dir(client, tmp_path / "upload", "digits", f"{prefix}-in")

    versions: list[DatasetVersioned] = []

    async def on_versioned(event: DatasetVersioned, _: Delivery) -> None:
        versions.append(event)

    admin = Settings(
        service="tests",
        subject_prefix=prefix,
        nats_url=nats_server.url,
        nats_user=ADMIN_USER,
        nats_password=nats_server.passwords[ADMIN_USER],
    )
    watcher = EventBus(admin)
    watcher.consume(DatasetVersioned, on_versioned, durable="tests-crash")
    repo = state / "ingest" / "repo"
    async with watcher:
        proc = subprocess.Popen([sys.executable, "-m", "services.ingest"], env=env, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if kill_when == "downloading" and staged_downloads(state) >= 100:
                    break
                if kill_when == "committed" and "digits/v1" in local_tags(repo):
                    break
                assert proc.poll() is None, "ingest exited on its own"
                await asyncio.sleep(0.005)
            else:
                raise AssertionError(f"ingest never reached {kill_when!r}")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            await asyncio.sleep(0.5)
            assert versions == [], "the version was announced before the kill: the test did not kill mid-way"
            if kill_when == "committed":
                print("remote tags at the kill:", remote_tags(state / "ingest" / "data.git"))

            proc = subprocess.Popen(
                [sys.executable, "-m", "services.ingest"], env=env, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + 120
            while not versions and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(3.0)  # several polls: nothing more may come
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # stuck mid-push on a loaded machine: the asserts below tell
                proc.kill()
                proc.wait()
    assert len({(v.dataset, v.version) for v in versions}) == 1, versions
    [version] = {v.version: v for v in versions}.values()
    assert version.version == 1 and sum(version.label_counts.values()) == 600
    assert remote_tags(state / "ingest" / "data.git") == ["digits/v1"]
    assert local_tags(repo) == ["digits/v1"]
