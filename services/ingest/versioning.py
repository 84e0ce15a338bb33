"""Turn one closed batch of object changes into (at most) one dataset version.

For each created object: check the key, download it while hashing (the md5 DVC records and the split is
assigned by), decode and check the image, stage it in DVC's cache. Bad files are quarantined with a reason
and reported; the rest of the batch goes on. Identical files under different labels are left out and
reported. The same content makes no version. A version is committed and tagged, pushed (DVC, then git), and
only then announced; ``recover`` finishes a version a crash interrupted.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from contracts.envelope import Event
from contracts.events import UNKNOWN_DATASET, DatasetRejected, DatasetVersioned, Duplicate, SplitCounts
from contracts.names import validate_name
from services.ingest.batcher import Batch
from services.ingest.known import KnownObject, KnownObjects
from services.ingest.manifest import FileEntry, Manifest, assign_split
from services.ingest.records import ObjectChange
from services.ingest.storage import Missing, ObjectStore, TooLarge
from services.ingest.validation import Limits, ObjectPath, Rejection, check_image, parse_key
from services.runtime.telemetry import get_logger

__all__ = ["BatchResult", "DataRepository", "Ingestor"]

DOWNLOADS_AT_ONCE = 8


class DataRepository(Protocol):
    """What ingest needs of its DVC data repository (``services.ingest.datarepo.DataRepo``)."""

    repo_url: str
    remote_url: str

    def stage_file(self, md5: str, source: Path) -> None: ...
    def commit_version(self, manifest: Manifest) -> Any: ...
    def publish(self, dataset: str, version: int) -> None: ...
    def latest_version(self, dataset: str) -> int: ...
    def read_manifest(self, dataset: str, version: int | None = None) -> Manifest | None: ...
    def datasets(self) -> list[str]: ...
    def recover(self) -> list[tuple[str, int]]: ...
    def version_commit(self, dataset: str, version: int) -> Any: ...


@dataclass
class BatchResult:
    dataset: str
    version: int | None = None  # None: no new version (nothing changed, or everything was rejected)
    rejected: list[DatasetRejected] = field(default_factory=list)
    event: DatasetVersioned | None = None


@dataclass
class _Checked:
    change: ObjectChange
    path: ObjectPath
    md5: str
    size: int
    local: Path


class Ingestor:
    def __init__(
        self,
        repo: DataRepository,
        store: ObjectStore,
        known: KnownObjects,
        publish: Callable[[Event], Awaitable[Any]],
        *,
        incoming_bucket: str,
        quarantine_bucket: str,
        limits: Limits,
        split: tuple[int, int, int] = (80, 10, 10),
        work_dir: Path | None = None,
    ) -> None:
        self.repo, self.store, self.known, self.publish = repo, store, known, publish
        self.incoming, self.quarantine_bucket = incoming_bucket, quarantine_bucket
        self.limits, self.split = limits, split
        self.work_dir = work_dir
        self.log = get_logger(component="ingestor")
        self._lock = asyncio.Lock()  # the data repository makes one version at a time

    async def process(self, batch: Batch) -> BatchResult:
        async with self._lock:
            return await self._process(batch)

    async def _process(self, batch: Batch) -> BatchResult:
        started = time.monotonic()
        result = BatchResult(batch.dataset)
        created = [c for c in batch.changes.values() if c.kind == "created"]
        removed = [c for c in batch.changes.values() if c.kind == "removed"]
        try:
            validate_name(batch.dataset)
        except ValueError:
            for change in created:
                rejection = parse_key(change.key)
                if not isinstance(rejection, Rejection):  # a valid key always names a valid dataset
                    rejection = Rejection("bad_name", f"invalid dataset name {batch.dataset!r}")
                result.rejected.append(await self._reject(change, UNKNOWN_DATASET, rejection))
            await self._remember(batch.dataset, result.rejected)
            return result

        # A version committed by an earlier try whose push or event failed is finished first.
        await self._finish_unannounced(batch.dataset)
        base = await asyncio.to_thread(self.repo.read_manifest, batch.dataset) or Manifest(batch.dataset)
        files = dict(base.files)
        by_source = {entry.source_key: path for path, entry in files.items()}
        for change in removed:
            if change.key in by_source:
                del files[by_source[change.key]]
        if removed:
            # A removal may end a cross-label duplicate: look at the files left out for one again.
            created += await self._left_out(batch)

        with tempfile.TemporaryDirectory(dir=self.work_dir, prefix="ingest-") as tmp:
            checked = await self._check_all(created, base, Path(tmp), result)
            previous_split = base.splits_seen()
            for item in checked:
                await asyncio.to_thread(self.repo.stage_file, item.md5, item.local)
                files[item.path.path] = FileEntry(
                    path=item.path.path,
                    label=item.path.label,
                    md5=item.md5,
                    size=item.size,
                    split=previous_split.get(item.md5) or assign_split(item.md5, self.split),
                    source_key=item.change.key,
                    etag=item.change.etag,
                )
        duplicates = _cross_label_duplicates(files)
        left_out_keys = {key for dup in duplicates for key in dup.keys}
        left_out = [e for e in files.values() if e.source_key in left_out_keys]
        files = {path: e for path, e in files.items() if e.source_key not in left_out_keys}
        content = {(p, e.md5) for p, e in files.items()}
        added, gone = len(content - base.content()), len(base.content() - content)
        held = {(e.source_key, e.etag) for e in base.files.values()}
        already = [c.key for c in created if c.etag and (c.key, c.etag) in held]  # brought again
        settled = [c.change.key for c in checked if c.change.key not in left_out_keys] + already
        removed_keys = [c.key for c in removed]

        if content == base.content():
            self.log.info("no new version: same content", dataset=batch.dataset, changes=len(batch.changes))
            current = Manifest(batch.dataset, base.version, files)  # with the etags this batch saw
            await self._remember(batch.dataset, result.rejected, current, settled, left_out, removed_keys)
            return result

        version = await asyncio.to_thread(self.repo.latest_version, batch.dataset) + 1
        manifest = Manifest(batch.dataset, version, files, retired=base.retired_after(files))
        manifest.notes = {
            "added": added,
            "removed": gone,
            "rejected": len(result.rejected),
            "duplicates": [d.model_dump() for d in duplicates],
        }
        commit = await asyncio.to_thread(self.repo.commit_version, manifest)
        await asyncio.to_thread(self.repo.publish, batch.dataset, version)
        manifest.notes["ingest_seconds"] = round(time.monotonic() - started, 3)
        result.version = version
        result.event = self.versioned_event(manifest, commit.git_rev, commit.dvc_md5)
        await self.publish(result.event)
        await self._remember(batch.dataset, result.rejected, manifest, settled, left_out, removed_keys)
        await self.known.set_announced(batch.dataset, version)
        self.log.info(
            "dataset versioned", dataset=batch.dataset, version=version, files=len(files), added=added
        )
        return result

    async def recover(self) -> list[DatasetVersioned]:
        """Finish what a crash interrupted: push committed versions, announce pushed ones never announced.

        A half-made version that was not committed is rolled back by the repository; its objects are found
        again by the poller or redelivered by JetStream, so nothing is lost.
        """
        async with self._lock:
            for dataset, version in await asyncio.to_thread(self.repo.recover):
                self.log.warning("finishing a version a crash interrupted", dataset=dataset, version=version)
                await asyncio.to_thread(self.repo.publish, dataset, version)
            announced = []
            for dataset in await asyncio.to_thread(self.repo.datasets):
                event = await self._finish_unannounced(dataset)
                if event is not None:
                    announced.append(event)
            return announced

    async def _finish_unannounced(self, dataset: str) -> DatasetVersioned | None:
        """Push and announce the newest version of ``dataset`` if a failure stopped that (else None).

        Pushing is idempotent and the event id follows the version, so doing it twice does no harm.
        """
        version = await asyncio.to_thread(self.repo.latest_version, dataset)
        if version == 0 or await self.known.announced(dataset) >= version:
            return None
        await asyncio.to_thread(self.repo.publish, dataset, version)
        manifest = await asyncio.to_thread(self.repo.read_manifest, dataset, version)
        assert manifest is not None
        commit = await asyncio.to_thread(self.repo.version_commit, dataset, version)
        event = self.versioned_event(manifest, commit.git_rev, commit.dvc_md5)
        await self.publish(event)
        await self._remember(dataset, [], manifest, [e.source_key for e in manifest.files.values()])
        await self.known.set_announced(dataset, version)
        return event

    async def _left_out(self, batch: Batch) -> list[ObjectChange]:
        known = await self.known.load()
        return [
            ObjectChange(self.incoming, obj.key, "created", etag=obj.etag)
            for obj in known.values()
            if obj.dataset == batch.dataset and obj.status == "left_out" and obj.key not in batch.changes
        ]

    async def _check_all(
        self, created: list[ObjectChange], base: Manifest, tmp: Path, result: BatchResult
    ) -> list[_Checked]:
        """Download and check every created object, a few at a time; reject the bad ones."""
        unchanged = {(e.source_key, e.etag) for e in base.files.values()}
        gate = asyncio.Semaphore(DOWNLOADS_AT_ONCE)

        async def check(index: int, change: ObjectChange) -> _Checked | None:
            parsed = parse_key(change.key)
            if isinstance(parsed, Rejection):
                result.rejected.append(await self._reject(change, change.dataset_token, parsed))
                return None
            if change.etag and (change.key, change.etag) in unchanged:
                return None  # a replayed or duplicated notification of what the version already holds
            local = tmp / f"{index:06d}"
            async with gate:
                try:
                    md5, size = await self.store.download(
                        self.incoming, change.key, local, self.limits.max_bytes
                    )
                except TooLarge as exc:
                    too_large = Rejection("too_large", str(exc))
                    result.rejected.append(await self._reject(change, parsed.dataset, too_large, exc.size))
                    return None
                except Missing:
                    return None  # deleted since it was listed or announced: its removal comes next
                info = await asyncio.to_thread(check_image, local, self.limits)
            if isinstance(info, Rejection):
                result.rejected.append(await self._reject(change, parsed.dataset, info, size))
                return None
            return _Checked(change, parsed, md5, size, local)

        checked = await asyncio.gather(*(check(i, c) for i, c in enumerate(created)))
        return [c for c in checked if c is not None]

    async def _reject(
        self, change: ObjectChange, dataset: str, rejection: Rejection, size: int | None = None
    ) -> DatasetRejected:
        """Copy the object to quarantine with a JSON reason beside it, and say so in an event."""
        dataset = dataset if _valid(dataset) else UNKNOWN_DATASET
        digest = hashlib.sha256(change.key.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]
        safe_name = "".join(
            ch if ch.isalnum() or ch in "._-" else "_" for ch in change.key.rsplit("/", 1)[-1]
        )
        to_key = f"{dataset}/{digest}-{safe_name[:80] or 'object'}"
        reason = {"key": change.key, "etag": change.etag, "code": rejection.code, "reason": rejection.reason}
        try:
            uri = await self.store.quarantine(
                self.incoming, change.key, self.quarantine_bucket, to_key, reason
            )
        except Exception as exc:  # the object vanished or cannot be read: the reason still tells why
            self.log.warning("could not copy to quarantine", key=change.key, error=repr(exc))
            uri = f"s3://{self.quarantine_bucket}/{to_key}.reason.json"
        event = DatasetRejected(
            dataset=dataset,
            bucket=self.incoming,
            key=change.key,
            etag=change.etag or "none",
            reason_code=rejection.code,
            reason=rejection.reason,
            quarantine_uri=uri,
            size_bytes=size if size is not None else change.size,
        )
        await self.publish(event)
        self.log.warning("file rejected", key=change.key, code=rejection.code, reason=rejection.reason)
        return event

    async def _remember(
        self,
        dataset: str,
        rejected: list[DatasetRejected],
        manifest: Manifest | None = None,
        settled_keys: Sequence[str] = (),
        left_out: Sequence[FileEntry] = (),
        removed_keys: Sequence[str] = (),
    ) -> None:
        """Record what this batch settled in the known objects, so the poller does not find it again."""
        entries = [KnownObject(r.key, r.etag, r.dataset, "rejected") for r in rejected]
        if manifest is not None:
            by_key = {e.source_key: e for e in manifest.files.values()}
            entries += [
                KnownObject(key, by_key[key].etag, dataset, "versioned", manifest.version)
                for key in settled_keys
                if key in by_key
            ]
        entries += [KnownObject(e.source_key, e.etag, dataset, "left_out") for e in left_out]
        await self.known.put(entries)
        await self.known.forget(list(removed_keys))

    def versioned_event(self, manifest: Manifest, git_rev: str, dvc_md5: str) -> DatasetVersioned:
        notes = manifest.notes
        return DatasetVersioned(
            dataset=manifest.dataset,
            version=manifest.version,
            git_rev=git_rev,
            dvc_md5=dvc_md5,
            repo_url=self.repo.repo_url,
            remote_url=self.repo.remote_url,
            label_counts=manifest.label_counts(),
            split_counts=SplitCounts(**manifest.split_counts()),
            total_bytes=manifest.total_bytes(),
            added=notes.get("added", 0),
            removed=notes.get("removed", 0),
            rejected=notes.get("rejected", 0),
            duplicates=[Duplicate(**d) for d in notes.get("duplicates", [])],
            source_digest=manifest.source_digest(),
            ingest_seconds=notes.get("ingest_seconds", 0.0),
        )


def _valid(name: str) -> bool:
    try:
        validate_name(name)
    except ValueError:
        return False
    return True


def _cross_label_duplicates(files: dict[str, FileEntry]) -> list[Duplicate]:
    """Files with identical content under different labels: their label is ambiguous, so all are left out."""
    by_md5: dict[str, list[FileEntry]] = defaultdict(list)
    for entry in files.values():
        by_md5[entry.md5].append(entry)
    return [
        Duplicate(md5=md5, keys=sorted(e.source_key for e in entries))
        for md5, entries in sorted(by_md5.items())
        if len({e.label for e in entries}) > 1
    ]
