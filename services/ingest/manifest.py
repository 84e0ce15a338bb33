"""The manifest of one dataset version: every file with its label, content hash, split and source object.

It is committed to git beside the dataset's ``.dvc`` file (``<dataset>.manifest.json``), so any consumer
with a clone of the data repository knows the labels and splits of a version without reading the data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

__all__ = ["SPLITS", "FileEntry", "Manifest", "Split", "assign_split"]

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class FileEntry:
    """One file of a version. ``path`` is ``<label>/<file>`` inside the dataset directory."""

    path: str
    label: str
    md5: str  # the content hash: what DVC records, and what assigns the split
    size: int
    split: Split
    source_key: str  # the object key in the incoming bucket, for lineage
    etag: str


@dataclass
class Manifest:
    dataset: str
    version: int = 0
    files: dict[str, FileEntry] = field(default_factory=dict)  # by path
    # What the version's event reports beyond the files (added, removed, rejected, duplicates, digests),
    # committed with it so that a version finished after a crash sends the same event.
    notes: dict[str, Any] = field(default_factory=dict)
    # md5 -> split of every file an earlier version held and this one does not: an image that comes back
    # returns to its split even if the split percentages changed meanwhile.
    retired: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        entries = [asdict(self.files[path]) for path in sorted(self.files)]
        doc = {
            "dataset": self.dataset,
            "version": self.version,
            "notes": self.notes,
            "retired": self.retired,
            "files": entries,
        }
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        doc = json.loads(text)
        files = {e["path"]: FileEntry(**e) for e in doc["files"]}
        return cls(
            dataset=doc["dataset"],
            version=doc["version"],
            files=files,
            notes=doc.get("notes", {}),
            retired=doc.get("retired", {}),
        )

    def splits_seen(self) -> dict[str, Split]:
        """md5 -> split of every file this version or an earlier one held."""
        seen: dict[str, Split] = {md5: cast(Split, split) for md5, split in self.retired.items()}
        seen.update({entry.md5: entry.split for entry in self.files.values()})
        return seen

    def retired_after(self, files: dict[str, FileEntry]) -> dict[str, str]:
        """The ``retired`` map of the next version, whose files are ``files``."""
        kept = {entry.md5 for entry in files.values()}
        gone = {entry.md5: entry.split for entry in self.files.values() if entry.md5 not in kept}
        return {md5: split for md5, split in (self.retired | gone).items() if md5 not in kept}

    def by_md5(self) -> dict[str, FileEntry]:
        return {entry.md5: entry for entry in self.files.values()}

    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.files.values():
            counts[entry.label] = counts.get(entry.label, 0) + 1
        return dict(sorted(counts.items()))

    def split_counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(SPLITS, 0)
        for entry in self.files.values():
            counts[entry.split] += 1
        return counts

    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def source_digest(self) -> str:
        """sha256 over the sorted (key, etag) of the source objects."""
        pairs = sorted((entry.source_key, entry.etag) for entry in self.files.values())
        return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()

    def content(self) -> set[tuple[str, str]]:
        """What makes two versions the same: (path, md5) pairs."""
        return {(entry.path, entry.md5) for entry in self.files.values()}


def assign_split(md5: str, percentages: tuple[int, int, int] = (80, 10, 10)) -> Split:
    """The split of a file from its content hash alone: the same image always lands in the same split."""
    bucket = int(md5[:8], 16) % 100
    train, val, _ = percentages
    if bucket < train:
        return "train"
    return "val" if bucket < train + val else "test"
