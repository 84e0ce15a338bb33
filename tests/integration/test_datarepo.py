"""The DVC data repository of ingest and the reader every consumer uses, against real git, DVC and rclone S3.

Each test has its own work dir, git remote (a bare repository under tmp_path) and DVC remote path
(``s3://dvc/<prefix>``), so tests never see each other's versions.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from services.ingest.datarepo import DataRepo
from services.ingest.dvcobjects import MissingObjectsError
from services.ingest.manifest import SPLITS, FileEntry, Manifest
from services.runtime.datasets import DatasetMismatch, DatasetNotFound, S3Remote, fetch_version, git
from tests.servers import S3Server

pytestmark = pytest.mark.integration

DVC = str(Path(sys.executable).with_name("dvc"))
DATASET = "cells"


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class Files:
    """Generated files of one dataset, kept under ``root/<label>/<name>`` as the source of truth."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def make(self, label: str, name: str, size: int = 200) -> FileEntry:
        path = self.root / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(size))
        md5 = md5_of(path)
        split = SPLITS[int(md5, 16) % 3]
        return FileEntry(f"{label}/{name}", label, md5, size, split, f"{DATASET}/{label}/{name}", md5)

    def path(self, entry: FileEntry) -> Path:
        return self.root / entry.path


def manifest(version: int, entries: list[FileEntry]) -> Manifest:
    return Manifest(DATASET, version, {e.path: e for e in entries})


@pytest.fixture
def make_repo(tmp_path: Path, s3_server: S3Server, prefix: str) -> Callable[[], DataRepo]:
    """A new ``DataRepo`` instance over this test's work dir, git remote and DVC remote."""

    def make() -> DataRepo:
        return DataRepo(
            tmp_path / "state" / "ingest" / "repo",
            str(tmp_path / "state" / "ingest" / "data.git"),
            f"s3://dvc/{prefix}/",
            s3_server.endpoint,
            s3_server.access_key,
            s3_server.secret_key,
        )

    return make


@pytest.fixture
def remote(s3_server: S3Server) -> S3Remote:
    return S3Remote(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)


def stage(repo: DataRepo, files: Files, entries: list[FileEntry], *, move: bool = False) -> None:
    """Stage copies (``move``: moved copies) of the entries, as ingest does with its downloads."""
    for entry in entries:
        source = files.path(entry)
        if move:
            tmp = source.with_name(source.name + ".download")
            shutil.copyfile(source, tmp)
            source = tmp
        repo.stage_file(entry.md5, source, move=move)
        assert not move or not source.exists()


def v1_files(files: Files) -> list[FileEntry]:
    return [files.make(label, f"img-{i}.png", 100 + i) for label in ("a", "b", "c") for i in range(4)]


def test_two_versions_published_and_version_1_read_back_from_a_fresh_clone(
    make_repo: Callable[[], DataRepo], remote: S3Remote, s3_server: S3Server, prefix: str, tmp_path: Path
) -> None:
    repo = make_repo()
    repo.ensure()
    repo.ensure()  # idempotent
    files = Files(tmp_path / "src")
    first = v1_files(files)
    stage(repo, files, first)
    c1 = repo.commit_version(manifest(1, first))
    repo.publish(DATASET, 1)
    assert (c1.version, c1.nfiles, c1.size) == (1, 12, sum(e.size for e in first))
    assert repo.commit_version(manifest(1, first)) == c1  # the same content again: the same version

    # Version 2: two files removed, three added (moved into the cache, like downloads).
    added = [files.make("a", "new-1.png"), files.make("d", "new-2.png"), files.make("d", "new 3 ü.png")]
    second = first[2:] + added
    stage(repo, files, added, move=True)
    c2 = repo.commit_version(manifest(2, second))
    repo.publish(DATASET, 2)
    repo.publish(DATASET, 2)  # idempotent

    assert repo.latest_version(DATASET) == 2 and repo.versions(DATASET) == [1, 2]
    assert repo.datasets() == [DATASET] and repo.latest_version("other") == 0
    assert repo.read_manifest("other") is None
    m1, m2 = repo.read_manifest(DATASET, 1), repo.read_manifest(DATASET)
    assert m1 is not None and m1.content() == manifest(1, first).content()
    assert m2 is not None and m2.version == 2 and m2.content() == manifest(2, second).content()
    assert repo.is_published(DATASET, 1) and repo.is_published(DATASET, 2)
    remote_refs = git(None, "ls-remote", repo.repo_url)
    assert f"refs/tags/{DATASET}/v1" in remote_refs and f"refs/tags/{DATASET}/v2" in remote_refs
    assert f"{c2.git_rev}\trefs/heads/main" in remote_refs
    assert repo.version_commit(DATASET, 1) == c1
    assert repo.recover() == []

    # Every object is on the DVC remote, under this test's path.
    keys = {
        o.object_name for o in s3_server.client().list_objects("dvc", prefix=f"{prefix}/", recursive=True)
    }
    wanted = {e.md5 for e in first + added} | {c1.dvc_md5, c2.dvc_md5}
    assert {f"{prefix}/files/md5/{m[:2]}/{m[2:]}" for m in wanted} <= keys

    # Version 1 from a fresh clone with an empty cache, after version 2 exists: byte-identical.
    cache = tmp_path / "trainer-cache"
    got = fetch_version(repo.repo_url, DATASET, 1, remote, cache, git_rev=c1.git_rev, dvc_md5=c1.dvc_md5)
    assert (got.version, got.git_rev, got.dvc_md5) == (1, c1.git_rev, c1.dvc_md5)
    assert [f.path for f in got] == sorted(e.path for e in first)
    by_path = {e.path: e for e in first}
    for f in got:
        assert f.local_path.read_bytes() == files.path(by_path[f.path]).read_bytes()
        assert (f.label, f.split, f.md5, f.size) == (
            by_path[f.path].label,
            by_path[f.path].split,
            by_path[f.path].md5,
            by_path[f.path].size,
        )
    assert got.labels() == ["a", "b", "c"]
    assert sum(len(got.by_split(s)) for s in SPLITS) == 12
    tree = got.materialize(tmp_path / "v1")
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()) == sorted(by_path)

    # A damaged object in the reader's cache is noticed and downloaded again.
    victim = got.files[0]
    victim.local_path.chmod(0o644)
    victim.local_path.write_bytes(b"damaged")
    healed = fetch_version(repo.repo_url, DATASET, 1, remote, cache)
    assert healed.files[0].local_path.read_bytes() == files.path(by_path[victim.path]).read_bytes()

    # The newest version from the same cache; a wrong announced rev or a missing version is refused.
    latest = fetch_version(repo.repo_url, DATASET, None, remote, cache)
    assert latest.version == 2 and latest.labels() == ["a", "b", "c", "d"]
    with pytest.raises(DatasetMismatch):
        fetch_version(repo.repo_url, DATASET, 1, remote, cache, git_rev=c2.git_rev)
    with pytest.raises(DatasetNotFound):
        fetch_version(repo.repo_url, DATASET, 3, remote, cache)


def test_dir_object_and_dvc_file_match_a_real_dvc_add(
    make_repo: Callable[[], DataRepo], tmp_path: Path
) -> None:
    repo = make_repo()
    repo.ensure()
    files = Files(tmp_path / "plain" / DATASET)
    entries = [*v1_files(files), files.make("b", "with space ü.tif", 3000), files.make("c", "empty.png", 0)]
    stage(repo, files, entries)
    commit = repo.commit_version(manifest(1, entries))

    plain = tmp_path / "plain"
    git(plain, "init", "--quiet")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([DVC, "init", "--quiet"], cwd=plain, check=True, env=env)
    subprocess.run([DVC, "add", "--quiet", DATASET], cwd=plain, check=True, env=env)

    ours = (repo.workdir / f"{DATASET}.dvc").read_text()
    assert ours == (plain / f"{DATASET}.dvc").read_text()
    md5 = commit.dvc_md5
    assert md5.endswith(".dir") and md5 in ours
    dir_object = Path("files", "md5", md5[:2], md5[2:])
    assert (repo.workdir / ".dvc" / "cache" / dir_object).read_bytes() == (
        plain / ".dvc" / "cache" / dir_object
    ).read_bytes()
    assert "/cells" in (repo.workdir / ".gitignore").read_text().splitlines()


def test_recover_publishes_a_committed_version_and_rolls_back_half_made_ones(
    make_repo: Callable[[], DataRepo], remote: S3Remote, tmp_path: Path
) -> None:
    repo = make_repo()
    repo.ensure()
    files = Files(tmp_path / "src")
    first = v1_files(files)
    stage(repo, files, first)
    repo.commit_version(manifest(1, first))
    repo.publish(DATASET, 1)
    second = [*first, files.make("a", "late.png")]
    stage(repo, files, second[-1:])
    c2 = repo.commit_version(manifest(2, second))  # crash before publish

    # A half-made third version: staged objects, a rewritten .dvc in the index, a new dataset's files.
    third = [*second, files.make("b", "half.png")]
    stage(repo, files, third[-1:])
    (repo.workdir / f"{DATASET}.dvc").write_text("outs: []\n")
    git(repo.workdir, "add", f"{DATASET}.dvc")
    (repo.workdir / "other.dvc").write_text("outs: []\n")
    (repo.workdir / "other.manifest.json").write_text("{}\n")
    # A tag that points to no commit on the branch (tagged, then the branch moved back).
    orphan = git(repo.workdir, "commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", "orphan")
    git(repo.workdir, "tag", f"{DATASET}/v9", orphan)

    restarted = make_repo()
    assert restarted.recover() == [(DATASET, 2)]
    assert git(restarted.workdir, "status", "--porcelain") == ""
    assert git(restarted.workdir, "rev-parse", "HEAD") == c2.git_rev  # nothing half-made was committed
    assert git(restarted.workdir, "tag", "--list", f"{DATASET}/v9") == ""
    assert restarted.versions(DATASET) == [1, 2] and not restarted.is_published(DATASET, 2)
    restarted.publish(DATASET, 2)
    assert restarted.is_published(DATASET, 2) and restarted.recover() == []

    got = fetch_version(restarted.repo_url, DATASET, 2, remote, tmp_path / "reader", git_rev=c2.git_rev)
    assert len(got) == 13

    # A version commit whose tag was never written (crash between commit and tag) is completed.
    stage(restarted, files, third[-1:])
    c3 = restarted.commit_version(manifest(3, third))
    git(restarted.workdir, "tag", "--delete", f"{DATASET}/v3")
    assert make_repo().recover() == [(DATASET, 3)]
    assert restarted.version_commit(DATASET, 3) == c3


def test_a_lost_work_dir_is_cloned_back_and_continues(
    make_repo: Callable[[], DataRepo], tmp_path: Path
) -> None:
    repo = make_repo()
    repo.ensure()
    files = Files(tmp_path / "src")
    first = v1_files(files)
    stage(repo, files, first)
    repo.commit_version(manifest(1, first))
    repo.publish(DATASET, 1)
    shutil.rmtree(repo.workdir)

    again = make_repo()
    assert again.recover() == []
    assert again.latest_version(DATASET) == 1
    second = [*first, files.make("c", "after-clone.png")]
    with pytest.raises(MissingObjectsError):
        again.commit_version(manifest(2, [*first, files.make("c", "never-staged.png")]))
    stage(again, files, second[-1:])
    # The objects of version 1 are not in the new cache: they come back from the DVC remote.
    c2 = again.commit_version(manifest(2, second))
    again.publish(DATASET, 2)
    assert c2.nfiles == 13 and again.is_published(DATASET, 2)
    with pytest.raises(ValueError, match="next version must be 3"):
        again.commit_version(manifest(5, second))
