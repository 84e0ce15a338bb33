"""DVC objects made from hashes ingest computed once, with dvc-data's own classes.

``dvc add`` would hash every file again. Ingest already has each file's md5 (it assigns the split), so it
puts the file into the cache under that md5 (``stage_object``), builds the directory ``Tree`` from the
manifest's (path, md5, size), writes the ``.dir`` object through the cache ODB and renders the ``.dvc``
file the way DVC's ``Output.dumpd`` does. The result is byte-identical to ``dvc add`` of the same folder
(tests/integration/test_datarepo.py compares them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dvc_data.hashfile.db import add_update_tree
from dvc_data.hashfile.db.local import LocalHashFileDB
from dvc_data.hashfile.hash_info import HashInfo
from dvc_data.hashfile.meta import Meta
from dvc_data.hashfile.tree import Tree
from dvc_objects.fs.local import LocalFileSystem

from services.runtime.datasets import is_md5

__all__ = ["DirObject", "MissingObjectsError", "build_dir", "dvc_file_text", "open_cache", "stage_object"]

HASH_NAME = "md5"  # DVC 3's hash of new outputs: plain md5 of the bytes (not 2.x's md5-dos2unix)


class MissingObjectsError(RuntimeError):
    """A version names files that are not in the DVC cache: stage them with ``DataRepo.stage_file`` first."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(
            f"{len(missing)} file(s) of the version are not in the DVC cache (e.g. {missing[:3]}): "
            "stage each file with DataRepo.stage_file(md5, path) before commit_version"
        )


@dataclass(frozen=True)
class DirObject:
    """The directory object of a version: its ``.dir`` md5, total bytes and number of files."""

    md5: str
    size: int
    nfiles: int


def open_cache(path: Path) -> LocalHashFileDB:
    """The local DVC cache ODB at ``path`` (``.dvc/cache/files/md5``), as DVC 3 lays it out."""
    return LocalHashFileDB(LocalFileSystem(), os.fspath(path), hash_name=HASH_NAME)


def stage_object(odb: LocalHashFileDB, md5: str, source: Path, *, move: bool = False) -> None:
    """Put ``source`` into the cache under ``md5`` without reading it.

    ``move`` renames the file into the cache (atomic on one file system; the fastest for a download that
    was only written for this); otherwise it is copied (reflinked where possible) through a temporary name,
    so a crash never leaves a truncated object under a valid name. The object is made read-only, as DVC does.
    """
    if not is_md5(md5):
        raise ValueError(f"{md5!r} is not an md5 hex digest")
    dest = odb.oid_to_path(md5)
    if os.path.exists(dest):
        if move:
            source.unlink(missing_ok=True)
        return
    if move:
        odb.makedirs(os.path.dirname(dest))
        odb.move(os.fspath(source), dest)
        odb.protect(dest)
    else:
        odb.add(os.fspath(source), odb.fs, md5, hardlink=False)


def missing_objects(odb: LocalHashFileDB, md5s: Iterable[str]) -> list[str]:
    """The md5s among ``md5s`` that have no object in the cache, sorted."""
    return sorted({m for m in md5s if not os.path.exists(odb.oid_to_path(m))})


def build_dir(odb: LocalHashFileDB, files: Iterable[tuple[str, str, int]]) -> DirObject:
    """Write the ``.dir`` object of the files ``(path, md5, size)`` into the cache and return it.

    Every file object must already be in the cache (``MissingObjectsError`` otherwise), so what is
    committed can always be pushed.
    """
    entries = sorted(files)
    missing = missing_objects(odb, (md5 for _, md5, _ in entries))
    if missing:
        raise MissingObjectsError(missing)
    tree = Tree()
    for path, md5, size in entries:
        tree.add(tuple(path.split("/")), Meta(size=size), HashInfo(HASH_NAME, md5))
    tree.digest()  # md5 of the sorted JSON list, suffixed ".dir": DVC's directory hash
    add_update_tree(odb, tree)
    assert tree.hash_info.value is not None
    return DirObject(tree.hash_info.value, sum(size for _, _, size in entries), len(entries))


def dvc_file_text(path: str, obj: DirObject) -> str:
    """The ``.dvc`` file that ``dvc add <path>`` writes for the directory ``obj``."""
    from dvc.utils.serialize import dumps_yaml

    out: dict[str, object] = dict(HashInfo(HASH_NAME, obj.md5).to_dict())
    out.update(Meta(size=obj.size, nfiles=obj.nfiles).to_dict())
    out["hash"] = HASH_NAME  # DVC 3 marks outputs hashed with plain md5 (2.x outputs lack this key)
    out["path"] = path
    return str(dumps_yaml({"outs": [out]}))
