"""The exact files of a dataset version, for any consumer (the trainer, the registry's gates, the CLI).

Ingest publishes each version as a commit tagged ``<dataset>/v<N>`` in a git repository whose
``<dataset>.dvc`` names the DVC directory object and whose ``<dataset>.manifest.json`` lists every file
with its label, split, md5 and size. ``fetch_version`` keeps one clone per repository URL under a cache
folder, fetches the tag, downloads the version's objects from the DVC remote into the clone's DVC cache
(each object once, shared by every version that holds it) and checks every file's md5 against the
manifest before handing it out.

Nothing here imports ingest: the manifest is read as the JSON it is. The git and DVC plumbing that ingest
shares with its readers (``git``, ``S3Remote``, ``configure_dvc``) lives here too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.events import DatasetRef, DatasetVersioned
from contracts.names import validate_name
from services.runtime.errors import PermanentError, TransientError

if TYPE_CHECKING:
    from services.runtime.config import Settings

__all__ = [
    "DVC_REMOTE",
    "DatasetFile",
    "DatasetFiles",
    "DatasetMismatch",
    "DatasetNotFound",
    "DatasetUnavailable",
    "GitError",
    "S3Remote",
    "configure_dvc",
    "fetch_event",
    "fetch_ref",
    "fetch_version",
    "file_lock",
    "git",
    "is_md5",
    "normalize_remote_url",
    "read_dvc_out",
    "read_manifest",
    "version_tag",
]

DVC_REMOTE = "storage"
"""The name of the DVC remote in every data repository (``core.remote``)."""

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")


# ---- errors ------------------------------------------------------------------------------------------


class GitError(TransientError):
    """A git command failed; its stderr says why (often an unreachable remote, so it is worth a retry)."""


class DatasetNotFound(PermanentError):
    """The repository has no such dataset version."""


class DatasetMismatch(PermanentError):
    """The version's files are not what its event, ``.dvc`` file or manifest says: never train on them."""


class DatasetUnavailable(TransientError):
    """The DVC remote did not deliver the version's objects (down, wrong keys, or objects missing)."""


# ---- shared plumbing: git and the DVC remote ------------------------------------------------------------


def version_tag(dataset: str, version: int) -> str:
    """The git tag of a dataset version: ``<dataset>/v<N>``."""
    return f"{dataset}/v{version}"


def git(cwd: Path | None, *args: str, check: bool = True) -> str:
    """Run ``git args`` in ``cwd`` without prompts and return its stdout (stripped).

    Raises ``GitError`` with git's message when it fails and ``check`` is true.
    """
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_ASKPASS": "true"}
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise GitError(f"git {' '.join(args)} failed in {cwd or '.'} (exit {proc.returncode}): {detail}")
    return proc.stdout.strip()


@dataclass(frozen=True)
class S3Remote:
    """Where the DVC objects are and how to reach them: the S3 endpoint, keys and region.

    ``url`` (``s3://bucket/path``) overrides the remote URL committed in the repository's ``.dvc/config``;
    a consumer passes the ``remote_url`` of the ``dataset.versioned`` event. The keys only ever go to the
    git-ignored ``.dvc/config.local``.
    """

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"  # rclone's S3 refuses requests signed for any other region
    url: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None = None) -> S3Remote:
        """The remote on the S3 store a service's settings name."""
        return cls(
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            region=settings.s3_region,
            url=url,
        )


def configure_dvc(root: Path, remote: S3Remote) -> None:
    """Point the DVC repository at ``root`` to ``remote``: endpoint, keys and region (and the URL when
    given) in ``.dvc/config.local``; DVC's site cache under ``.dvc/tmp`` so nothing lands outside ``root``."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.config.edit("local") as conf:
        core = conf.setdefault("core", {})
        core["site_cache_dir"] = str(root / ".dvc" / "tmp" / "site")
        core["remote"] = DVC_REMOTE
        section = conf.setdefault("remote", {}).setdefault(DVC_REMOTE, {})
        section.update(
            endpointurl=remote.endpoint,
            access_key_id=remote.access_key,
            secret_access_key=remote.secret_key,
            region=remote.region,
        )
        if remote.url:
            section["url"] = normalize_remote_url(remote.url)


def normalize_remote_url(url: str) -> str:
    """``s3://bucket/path`` without trailing slashes (rclone's S3 rejects the ``//`` keys they would make)."""
    if not url.startswith("s3://") or not url.removeprefix("s3://").strip("/"):
        raise ValueError(f"DVC remote {url!r} is not an s3://bucket[/path] URL")
    return url.rstrip("/")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed): one writer per folder across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_dvc_out(text: str, source: str) -> tuple[str, int, int]:
    """(md5, size, nfiles) of the single directory output of a ``.dvc`` file's text."""
    from dvc.utils.serialize import parse_yaml

    doc = parse_yaml(text, source)
    try:
        (out,) = doc["outs"]
        md5 = str(out["md5"])
        size, nfiles = int(out.get("size", 0)), int(out.get("nfiles", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetMismatch(f"{source} is not a DVC file of one directory: {exc!r}") from exc
    if not md5.endswith(".dir"):
        raise DatasetMismatch(f"{source} tracks a file, not a dataset directory")
    return md5, size, nfiles


# ---- what a consumer gets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetFile:
    """One file of a version; ``local_path`` is its read-only copy in the DVC cache (do not modify it)."""

    path: str  # <label>/<file> inside the dataset
    label: str
    split: str
    md5: str
    size: int
    local_path: Path


@dataclass(frozen=True)
class DatasetFiles:
    """Every file of one dataset version, sorted by path, each checked against its md5."""

    dataset: str
    version: int
    git_rev: str
    dvc_md5: str
    repo_url: str
    files: tuple[DatasetFile, ...]

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[DatasetFile]:
        return iter(self.files)

    def by_split(self, split: str) -> list[DatasetFile]:
        """The files of one split (``train``, ``val`` or ``test``)."""
        return [f for f in self.files if f.split == split]

    def labels(self) -> list[str]:
        """The labels of this version, sorted: index i of this list is class i."""
        return sorted({f.label for f in self.files})

    def ref(self) -> DatasetRef:
        """This version as the ``DatasetRef`` that events carry."""
        return DatasetRef(name=self.dataset, version=self.version, git_rev=self.git_rev, dvc_md5=self.dvc_md5)

    def materialize(self, dest: Path) -> Path:
        """Lay the files out as ``dest/<label>/<file>`` (ImageFolder), hard-linked from the cache where the
        file system allows it, else copied. Returns ``dest``."""
        for entry in self.files:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.unlink()
            try:
                os.link(entry.local_path, target)
            except OSError:
                shutil.copyfile(entry.local_path, target)
        return dest


# ---- fetching -----------------------------------------------------------------------------------------


def fetch_event(event: DatasetVersioned, remote: S3Remote, cache_dir: Path) -> DatasetFiles:
    """The files of the version a ``dataset.versioned`` event announces (its repository, remote and rev)."""
    remote = S3Remote(remote.endpoint, remote.access_key, remote.secret_key, remote.region, event.remote_url)
    return fetch_version(
        event.repo_url,
        event.dataset,
        event.version,
        remote,
        cache_dir,
        git_rev=event.git_rev,
        dvc_md5=event.dvc_md5,
    )


def fetch_ref(ref: DatasetRef, repo_url: str, remote: S3Remote, cache_dir: Path) -> DatasetFiles:
    """The files of ``ref``, checked against its git rev and DVC md5."""
    return fetch_version(
        repo_url, ref.name, ref.version, remote, cache_dir, git_rev=ref.git_rev, dvc_md5=ref.dvc_md5
    )


def fetch_version(
    repo_url: str,
    dataset: str,
    version: int | None,
    remote: S3Remote,
    cache_dir: Path,
    *,
    git_rev: str | None = None,
    dvc_md5: str | None = None,
    verify: bool = True,
) -> DatasetFiles:
    """Fetch version ``version`` of ``dataset`` (None: the newest) from the data repository ``repo_url``.

    ``cache_dir`` keeps one clone per repository URL and its DVC cache; a second call for the same version
    downloads nothing. ``git_rev`` and ``dvc_md5``, when given (from an event), must match what the tag
    holds. Every file's md5 is checked against the manifest unless ``verify`` is false.

    Raises ``DatasetNotFound`` (no such version), ``DatasetMismatch`` (content differs from what was
    announced), ``DatasetUnavailable`` / ``GitError`` (a remote failed; retry later).
    """
    validate_name(dataset)
    if version is not None and version < 1:
        raise DatasetNotFound(f"dataset versions start at 1, not {version}")
    clone = cache_dir / "repos" / hashlib.sha256(repo_url.encode()).hexdigest()[:16]
    with file_lock(clone.with_name(clone.name + ".lock")):
        _ensure_clone(repo_url, clone)
        configure_dvc(clone, remote)
        version, rev = _resolve(clone, repo_url, dataset, version, need_fetch=version is None)
        if git_rev is not None and rev != git_rev:
            raise DatasetMismatch(
                f"{version_tag(dataset, version)} in {repo_url} is commit {rev}, not {git_rev} as announced"
            )
        dir_md5, _, _ = read_dvc_out(git(clone, "show", f"{rev}:{dataset}.dvc"), f"{dataset}.dvc@{rev}")
        if dvc_md5 is not None and dir_md5 != dvc_md5:
            raise DatasetMismatch(f"{dataset}.dvc@{rev} records {dir_md5}, not {dvc_md5} as announced")
        manifest = json.loads(git(clone, "show", f"{rev}:{dataset}.manifest.json"))
        files = _download(clone, dataset, rev, dir_md5, manifest["files"])
        bad = _corrupt(files) if verify else []
        if bad:
            # A damaged cache object (a disk error, a copy killed half-way): drop it and download it again.
            for entry in bad:
                entry.local_path.unlink(missing_ok=True)
            files = _download(clone, dataset, rev, dir_md5, manifest["files"])
            bad = _corrupt(files)
        if bad:
            problems = [f"{e.path}: manifest md5 {e.md5}" for e in bad[:3]]
            raise DatasetMismatch(
                f"{len(bad)} file(s) of {dataset}@{rev} do not match the manifest's md5 even after a fresh "
                f"download, e.g. {problems}: the DVC remote holds damaged objects"
            )
    return DatasetFiles(dataset, version, rev, dir_md5, repo_url, tuple(sorted(files, key=lambda f: f.path)))


def read_manifest(
    repo_url: str, dataset: str, version: int, cache_dir: Path
) -> tuple[str, str, dict[str, Any]]:
    """(git rev, DVC md5, manifest) of a version, without its data: what lineage shows."""
    validate_name(dataset)
    clone = cache_dir / "repos" / hashlib.sha256(repo_url.encode()).hexdigest()[:16]
    with file_lock(clone.with_name(clone.name + ".lock")):
        _ensure_clone(repo_url, clone)
        version, rev = _resolve(clone, repo_url, dataset, version, need_fetch=False)
        dir_md5, _, _ = read_dvc_out(git(clone, "show", f"{rev}:{dataset}.dvc"), f"{dataset}.dvc@{rev}")
        manifest: dict[str, Any] = json.loads(git(clone, "show", f"{rev}:{dataset}.manifest.json"))
    return rev, dir_md5, manifest


def _ensure_clone(repo_url: str, clone: Path) -> None:
    if (clone / ".git").is_dir():
        return
    # Clone next to the final place and rename it there, so a crash never leaves a half-made clone.
    clone.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=clone.name + ".", dir=clone.parent))
    try:
        git(None, "clone", "--quiet", repo_url, str(tmp / "repo"))
        if not (tmp / "repo" / ".dvc").is_dir():
            raise DatasetNotFound(f"{repo_url} is not a DVC data repository (no .dvc/ on its main branch)")
        os.replace(tmp / "repo", clone)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve(
    clone: Path, repo_url: str, dataset: str, version: int | None, need_fetch: bool
) -> tuple[int, str]:
    """(version, commit) of the tag; fetches tags from the remote when the tag is not known yet."""

    def local() -> tuple[int, str] | None:
        if version is None:
            found = [int(t.rsplit("/v", 1)[1]) for t in git(clone, "tag", "--list", f"{dataset}/v*").split()]
            found = [v for v in found if v > 0]
            if not found:
                return None
            chosen = max(found)
        else:
            chosen = version
        rev = git(
            clone,
            "rev-parse",
            "--verify",
            "--quiet",
            f"refs/tags/{version_tag(dataset, chosen)}^{{commit}}",
            check=False,
        )
        return (chosen, rev) if rev else None

    found = None if need_fetch else local()
    if found is None:
        git(clone, "fetch", "--quiet", "--tags", "--force", "origin")
        # Follow the remote's branch too: its .dvc/config (the remote URL) is what DVC reads here.
        git(clone, "reset", "--quiet", "--hard", "origin/HEAD")
        found = local()
    if found is None:
        what = "any version" if version is None else f"version {version}"
        raise DatasetNotFound(f"{repo_url} has no {what} of dataset {dataset!r} (no tag {dataset}/v<N>)")
    return found


def _download(
    clone: Path, dataset: str, rev: str, dir_md5: str, entries: list[dict[str, Any]]
) -> list[DatasetFile]:
    """Fetch the objects the cache lacks with DVC; check the directory object against the manifest."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    with Repo(str(clone)) as repo:
        odb = repo.cache.local
        wanted = [dir_md5, *(e["md5"] for e in entries)]
        if any(not os.path.exists(odb.oid_to_path(oid)) for oid in wanted):
            try:
                repo.fetch(targets=[f"{dataset}.dvc"], revs=[rev], workspace=False, remote=DVC_REMOTE)
            except (DvcException, OSError) as exc:  # S3 refusals (wrong keys) surface as PermissionError
                url = repo.config["remote"][DVC_REMOTE].get("url")
                raise DatasetUnavailable(
                    f"dvc fetch of {dataset}@{rev} from {url} failed "
                    f"({exc!r}): check the S3 endpoint, keys and remote URL (DVC logged the cause)"
                ) from exc
        missing = [oid for oid in wanted if not os.path.exists(odb.oid_to_path(oid))]
        if missing:
            raise DatasetUnavailable(
                f"{len(missing)} object(s) of {dataset}@{rev} are not on the DVC remote, e.g. {missing[:3]}: "
                "check the remote URL and keys, or whether ingest finished pushing this version"
            )
        tree = Tree.load(odb, HashInfo("md5", dir_md5))
        in_tree = {"/".join(key): hi.value for key, _, hi in tree}
        in_manifest = {e["path"]: e["md5"] for e in entries}
        if in_tree != in_manifest:
            differ = sorted(set(in_tree.items()) ^ set(in_manifest.items()))[:3]
            raise DatasetMismatch(
                f"{dataset}@{rev}: the DVC directory and the manifest differ, e.g. {differ}"
            )
        return [
            DatasetFile(
                path=e["path"],
                label=e["label"],
                split=e["split"],
                md5=e["md5"],
                size=int(e["size"]),
                local_path=Path(odb.oid_to_path(e["md5"])),
            )
            for e in entries
        ]


def _corrupt(files: Iterable[DatasetFile]) -> list[DatasetFile]:
    """The files whose bytes do not hash to their manifest md5 (in threads: hashlib releases the GIL)."""

    def bad(entry: DatasetFile) -> bool:
        with entry.local_path.open("rb") as handle:
            return hashlib.file_digest(handle, "md5").hexdigest() != entry.md5

    files = list(files)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        flags = list(pool.map(bad, files))
    return [entry for entry, flag in zip(files, flags, strict=True) if flag]


def is_md5(value: str) -> bool:
    """True for a lower-case hex md5 (what DVC records)."""
    return bool(_MD5_RE.match(value))
