"""The DVC data repository that ingest owns: one git commit and tag ``<dataset>/v<N>`` per dataset version.

Layout: ``<dataset>.dvc`` tracks the directory ``<dataset>/`` (git-ignored, never materialized here) and
``<dataset>.manifest.json`` lists its files with labels and splits. Files enter the DVC cache under the md5
ingest computed (``stage_file``), ``commit_version`` commits and tags locally, ``publish`` pushes the
objects to the DVC remote and only then the branch and tag to the git remote: a version is published when
its tag is in the git remote, and by then its data is on the DVC remote. ``recover`` at start-up rolls back
what a crash left half-made and lists the versions still to publish.

All methods block (git and DVC do I/O, and DVC's S3 client runs its own event loop): call them from a
worker thread in async code (``asyncio.to_thread``). One process at a time writes a work dir (a file lock).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dvc_data.hashfile.db.local import LocalHashFileDB

from contracts.names import NAME_PATTERN, validate_name
from services.ingest.dvcobjects import build_dir, dvc_file_text, missing_objects, open_cache, stage_object
from services.ingest.manifest import Manifest
from services.ingest.repo_setup import BRANCH, clone_url, setup_repo
from services.runtime.datasets import (
    DVC_REMOTE,
    GitError,
    S3Remote,
    file_lock,
    git,
    normalize_remote_url,
    read_dvc_out,
    version_tag,
)
from services.runtime.errors import TransientError

__all__ = ["DataRepo", "PublishError", "VersionCommit"]

TRAILER = "Conveyor-Version"  # in each version's commit message, so recover can tag a commit left untagged
_TAG_RE = re.compile(rf"^({NAME_PATTERN})/v([1-9][0-9]*)$")


class PublishError(TransientError):
    """``dvc push`` or ``git push`` failed; the version stays unpublished and ``publish`` can be retried."""


@dataclass(frozen=True)
class VersionCommit:
    """A committed version: what the ``dataset.versioned`` event needs from the repository."""

    dataset: str
    version: int
    git_rev: str
    dvc_md5: str
    nfiles: int
    size: int


class DataRepo:
    """The git + DVC repository in ``workdir``, with its git remote and its DVC remote on S3."""

    def __init__(
        self,
        workdir: Path,
        git_remote: str,
        dvc_remote: str,
        s3_endpoint: str,
        s3_access_key: str,
        s3_secret_key: str,
        s3_region: str = "us-east-1",
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.git_remote = git_remote
        self.dvc_remote = normalize_remote_url(dvc_remote)
        self.s3 = S3Remote(s3_endpoint, s3_access_key, s3_secret_key, s3_region, url=self.dvc_remote)
        self._mutex = threading.RLock()
        self._depth = 0
        self._lock_cm: contextlib.ExitStack | None = None
        self._odb: LocalHashFileDB | None = None
        self.repo_url = clone_url(git_remote)
        """The git remote as a URL readers can clone (a local path becomes ``file://...``)."""
        self.remote_url = self.dvc_remote
        """The DVC remote, ``s3://bucket/path``."""

    # ---- set-up ---------------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the repository (git, DVC, remotes, identity), or clone it when the work dir is missing
        and the git remote has history. Safe to call again: it only completes what is missing."""
        with self._locked():
            setup_repo(self.workdir, self.git_remote, self.s3)
            self._odb = open_cache(Path(self._cache_path()))

    def _cache_path(self) -> str:
        from dvc.repo import Repo

        with Repo(str(self.workdir)) as repo:
            return str(repo.cache.local.path)

    # ---- writing a version ------------------------------------------------------------------------------

    def stage_file(self, md5: str, source: Path, *, move: bool = False) -> None:
        """Put ``source``, whose md5 the caller computed, into the DVC cache under ``md5`` without hashing
        it again. ``move`` renames it into the cache; otherwise it is copied. Already cached: a no-op."""
        stage_object(self._cache(), md5, source, move=move)

    def missing(self, md5s: Iterable[str]) -> list[str]:
        """The md5s that have no object in the local DVC cache yet (stage only those)."""
        return missing_objects(self._cache(), md5s)

    def commit_version(self, manifest: Manifest) -> VersionCommit:
        """Commit ``manifest`` as version ``manifest.version`` (the latest + 1) and tag it, locally.

        Every file must be staged; after a fresh clone, objects of earlier versions are fetched back from
        the DVC remote. Committing the same content again under an existing tag returns that version.
        """
        dataset, version = validate_name(manifest.dataset), manifest.version
        tag = version_tag(dataset, version)
        for path, entry in manifest.files.items():
            parts = path.split("/")
            if path != entry.path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"manifest path {path!r} is not a relative <label>/<file> path")
        with self._locked():
            if self._tag_commit(tag):
                committed = self.read_manifest(dataset, version)
                if committed is not None and committed.content() == manifest.content():
                    return self.version_commit(dataset, version)
                raise ValueError(
                    f"{tag} already exists with other content; the next version is "
                    f"{self.latest_version(dataset) + 1}"
                )
            latest = self.latest_version(dataset)
            if version != latest + 1:
                raise ValueError(
                    f"{dataset} is at version {latest}: the next version must be {latest + 1}, not {version}"
                )
            files = [(e.path, e.md5, e.size) for e in manifest.files.values()]
            if latest and self.missing(md5 for _, md5, _ in files):
                self._fetch(dataset, version_tag(dataset, latest))  # a fresh clone has an empty cache
            obj = build_dir(self._cache(), files)
            (self.workdir / f"{dataset}.dvc").write_text(dvc_file_text(dataset, obj))
            (self.workdir / f"{dataset}.manifest.json").write_text(manifest.to_json())
            self._ignore(f"/{dataset}")
            git(self.workdir, "add", "--", f"{dataset}.dvc", f"{dataset}.manifest.json", ".gitignore")
            title = f"{dataset} v{version}: {obj.nfiles} files, {obj.size} bytes"
            message = f"{title}\n\n{TRAILER}: {tag}\nDVC-Md5: {obj.md5}\n"
            git(self.workdir, "commit", "--quiet", "--no-verify", "-m", message)
            git(self.workdir, "tag", "--annotate", "--message", title, tag)
            rev = git(self.workdir, "rev-parse", "HEAD")
            return VersionCommit(dataset, version, rev, obj.md5, obj.nfiles, obj.size)

    def publish(self, dataset: str, version: int) -> None:
        """Push the version's objects to the DVC remote, then its commit (as the branch) and its tag to the
        git remote, atomically. Idempotent: after a crash, calling it again completes what is missing."""
        tag = version_tag(dataset, version)
        with self._locked():
            rev = self._tag_commit(tag)
            if not rev:
                raise LookupError(f"{tag} is not committed in {self.workdir}: nothing to publish")
            self._push_data(dataset, tag)
            refs = [f"refs/tags/{tag}"]
            remote_head = git(self.workdir, "ls-remote", "origin", f"refs/heads/{BRANCH}").split()[:1]
            if not (remote_head and self._is_ancestor(rev, remote_head[0])):
                refs.insert(0, f"{rev}:refs/heads/{BRANCH}")  # the branch moves to the newest published
            try:
                git(self.workdir, "push", "--quiet", "--atomic", "origin", *refs)
            except GitError as exc:
                raise PublishError(f"git push of {tag} to {self.git_remote} failed: {exc}") from exc

    def _push_data(self, dataset: str, tag: str) -> None:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        try:
            with Repo(str(self.workdir)) as repo:
                repo.push(targets=[f"{dataset}.dvc"], revs=[tag], workspace=False, remote=DVC_REMOTE)
        except (DvcException, OSError) as exc:  # S3 refusals (wrong keys) surface as PermissionError
            raise PublishError(
                f"dvc push of {tag} to {self.dvc_remote} at {self.s3.endpoint} failed ({exc!r}): check that "
                "the S3 store is up and the keys are right; publish again to finish this version"
            ) from exc

    def _fetch(self, dataset: str, tag: str) -> None:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        # Best effort: whatever is still missing afterwards is reported by build_dir.
        with contextlib.suppress(DvcException, OSError), Repo(str(self.workdir)) as repo:
            repo.fetch(targets=[f"{dataset}.dvc"], revs=[tag], workspace=False, remote=DVC_REMOTE)

    # ---- reading -------------------------------------------------------------------------------------

    def is_published(self, dataset: str, version: int) -> bool:
        """True when the version's tag is in the git remote (its data was pushed before it)."""
        return bool(git(self.workdir, "ls-remote", "origin", f"refs/tags/{version_tag(dataset, version)}"))

    def versions(self, dataset: str) -> list[int]:
        """The committed versions of ``dataset``, ascending (from local tags)."""
        return sorted(v for name, v in self._tags() if name == dataset)

    def latest_version(self, dataset: str) -> int:
        """The newest committed version of ``dataset``; 0 when it has none."""
        return max(self.versions(dataset), default=0)

    def datasets(self) -> list[str]:
        """Every dataset with at least one committed version, sorted."""
        return sorted({name for name, _ in self._tags()})

    def read_manifest(self, dataset: str, version: int | None = None) -> Manifest | None:
        """The manifest of a version (None: the newest); None when the dataset has no such version."""
        version = self.latest_version(dataset) if version is None else version
        if not version or not self._tag_commit(version_tag(dataset, version)):
            return None
        tag = version_tag(dataset, version)
        return Manifest.from_json(git(self.workdir, "show", f"refs/tags/{tag}:{dataset}.manifest.json"))

    def version_commit(self, dataset: str, version: int) -> VersionCommit:
        """Rev and DVC md5 of a committed version (to re-send its event after ``recover``)."""
        tag = version_tag(dataset, version)
        rev = self._tag_commit(tag)
        if not rev:
            raise LookupError(f"{tag} is not committed in {self.workdir}")
        md5, size, nfiles = read_dvc_out(git(self.workdir, "show", f"{rev}:{dataset}.dvc"), f"{tag}.dvc")
        return VersionCommit(dataset, version, rev, md5, nfiles, size)

    # ---- crash recovery -----------------------------------------------------------------------------

    def recover(self) -> list[tuple[str, int]]:
        """Undo what a crash left half-made and return the committed but unpublished versions, oldest
        first; the caller publishes each and re-sends its event.

        A version commit left without its tag is tagged (it is whole); staged or written files that no
        commit holds are discarded (their cache objects stay, for the retry); locks git left behind are
        removed, and tags that point to no commit on the branch are deleted.
        """
        with self._locked():
            dotgit = self.workdir / ".git"
            for lock in [dotgit / "index.lock", dotgit / "HEAD.lock", *dotgit.glob("refs/**/*.lock")]:
                lock.unlink(missing_ok=True)  # we hold the work dir's lock: no live git owns these
            # Roll back first, so that ensure() never commits a half-made version with its config.
            if dotgit.is_dir() and git(self.workdir, "rev-parse", "--verify", "--quiet", "HEAD", check=False):
                git(self.workdir, "reset", "--quiet", "--hard", "HEAD")
                git(self.workdir, "clean", "--quiet", "-d", "--force")
            self.ensure()
            on_branch = set(git(self.workdir, "rev-list", "HEAD").split())
            published = self._remote_tags()
            for tag, commit in self._tag_commits().items():
                if commit not in on_branch and tag not in published:
                    git(self.workdir, "tag", "--delete", tag)
            self._complete_tags()
            pending: list[tuple[int, str, int]] = []
            for tag, commit in self._tag_commits().items():
                if commit in on_branch and tag not in published:
                    name, version = _parse_tag(tag)
                    pending.append((int(git(self.workdir, "rev-list", "--count", commit)), name, version))
            return [(name, version) for _, name, version in sorted(pending)]

    def _complete_tags(self) -> None:
        """Tag each version commit on the branch whose tag a crash kept from being written."""
        fmt = f"--format=%H %(trailers:key={TRAILER},valueonly,separator=%x20)"
        for line in git(self.workdir, "log", fmt, "HEAD").splitlines():
            commit, _, tag = line.partition(" ")
            if _TAG_RE.match(tag) and not self._tag_commit(tag):
                git(self.workdir, "tag", "--annotate", "--message", f"{tag} (tagged by recover)", tag, commit)

    # ---- helpers ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Re-entrant in this process; a file lock beside the work dir keeps other processes out."""
        with self._mutex:
            if self._depth == 0:
                stack = contextlib.ExitStack()
                stack.enter_context(file_lock(self.workdir.with_name(self.workdir.name + ".lock")))
                self._lock_cm = stack
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_cm is not None:
                    self._lock_cm.close()
                    self._lock_cm = None

    def _cache(self) -> LocalHashFileDB:
        if self._odb is None:
            if not (self.workdir / ".dvc").is_dir():
                raise RuntimeError(f"{self.workdir} is no DVC repository yet: call DataRepo.ensure() first")
            self._odb = open_cache(Path(self._cache_path()))
        return self._odb

    def _ignore(self, pattern: str) -> None:
        path = self.workdir / ".gitignore"
        lines = path.read_text().splitlines() if path.exists() else []
        if pattern not in lines:
            path.write_text("\n".join([*lines, pattern]) + "\n")

    def _tags(self) -> list[tuple[str, int]]:
        return [_parse_tag(t) for t in git(self.workdir, "tag", "--list").split() if _TAG_RE.match(t)]

    def _tag_commit(self, tag: str) -> str:
        """The commit a tag points to; empty when there is no such tag (or it points nowhere)."""
        ref = f"refs/tags/{tag}^{{commit}}"
        return git(self.workdir, "rev-parse", "--verify", "--quiet", ref, check=False)

    def _tag_commits(self) -> dict[str, str]:
        """Every version tag with its commit ('' when it points to no commit)."""
        return {
            t: self._tag_commit(t) for t in git(self.workdir, "tag", "--list").split() if _TAG_RE.match(t)
        }

    def _remote_tags(self) -> set[str]:
        lines = git(self.workdir, "ls-remote", "--tags", "origin").splitlines()
        refs = (line.split()[1] for line in lines if line.strip())
        return {r.removeprefix("refs/tags/") for r in refs if not r.endswith("^{}")}

    def _is_ancestor(self, rev: str, other: str) -> bool:
        """True when ``rev`` is ``other`` or one of its ancestors (False when ``other`` is unknown here)."""
        return git(self.workdir, "merge-base", rev, other, check=False) == rev


def _parse_tag(tag: str) -> tuple[str, int]:
    match = _TAG_RE.match(tag)
    assert match is not None
    return match.group(1), int(match.group(2))
