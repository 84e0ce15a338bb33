"""Creating ingest's data repository: git and DVC initialized, remotes and identity configured.

``setup_repo`` is idempotent: it creates the bare git remote when it is a local path that does not exist,
clones the work dir from the remote when the work dir is missing and the remote has history (a new host,
a lost disk), else initializes it, and then (re)writes the configuration, committing DVC's own files when
they change. ``DataRepo.ensure`` calls it under the work dir's lock.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from services.runtime.datasets import DVC_REMOTE, S3Remote, configure_dvc, git

__all__ = ["BRANCH", "IDENTITY", "clone_url", "local_path", "setup_repo"]

BRANCH = "main"
IDENTITY = {"user.name": "Conveyor ingest", "user.email": "ingest@conveyor.invalid"}
"""Repository-local: CI runs as root with no global git identity."""


def setup_repo(workdir: Path, git_remote: str, s3: S3Remote) -> None:
    """Make ``workdir`` a git + DVC repository whose origin is ``git_remote`` and whose DVC remote is
    ``s3`` (its ``url``), creating, cloning or completing whatever is missing."""
    if not s3.url:
        raise ValueError("the DVC remote needs a URL (s3://<bucket>/<path>) in S3Remote.url")
    remote = local_path(git_remote)
    # An empty folder is a fresh volume mounted where the remote goes (deploy/compose): initialise it too.
    if remote is not None and (not remote.exists() or not any(remote.iterdir())):
        remote.parent.mkdir(parents=True, exist_ok=True)
        git(None, "init", "--quiet", "--bare", "--initial-branch", BRANCH, str(remote))
    if not (workdir / ".git").is_dir():
        if git(None, "ls-remote", "--heads", git_remote, BRANCH):
            _clone(workdir, git_remote)
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            git(workdir, "init", "--quiet", "--initial-branch", BRANCH)
    _configure(workdir, git_remote, s3)


def _clone(workdir: Path, git_remote: str) -> None:
    # Into a temporary sibling, then renamed: a crash never leaves a half-made clone as the work dir.
    workdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{workdir.name}.", dir=workdir.parent))
    try:
        git(None, "clone", "--quiet", "--branch", BRANCH, git_remote, str(tmp / "repo"))
        if workdir.exists():
            workdir.rmdir()  # only an empty leftover; anything else is not ours to delete
        os.replace(tmp / "repo", workdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _configure(workdir: Path, git_remote: str, s3: S3Remote) -> None:
    from dvc.repo import Repo

    for key, value in {**IDENTITY, "commit.gpgsign": "false", "tag.gpgsign": "false"}.items():
        git(workdir, "config", key, value)
    if "origin" in git(workdir, "remote").split():
        git(workdir, "remote", "set-url", "origin", git_remote)
    else:
        git(workdir, "remote", "add", "origin", git_remote)
    if not (workdir / ".dvc").is_dir():
        # The CLI, not Repo.init: the API logs its "you can now commit" banner to our stdout.
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        argv = [sys.executable, "-m", "dvc", "init", "--quiet"]
        proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"dvc init in {workdir} failed: {proc.stderr.strip()}")
    # The remote's URL is committed so that a clone knows it; endpoint and keys stay in config.local.
    with Repo(str(workdir)) as repo, repo.config.edit("repo") as conf:
        conf.setdefault("core", {}).update(analytics="false", remote=DVC_REMOTE)
        conf.setdefault("remote", {}).setdefault(DVC_REMOTE, {})["url"] = s3.url
    configure_dvc(workdir, s3)
    # Commit only DVC's own files: anything else in the index belongs to a version being made.
    paths = [".dvc", ".dvcignore"]
    git(workdir, "add", "--all", "--", *paths)
    has_head = bool(git(workdir, "rev-parse", "--verify", "--quiet", "HEAD", check=False))
    if not has_head or git(workdir, "diff", "--cached", "--name-only", "--", *paths):
        message = "Configure the DVC remote" if has_head else "Initialize the data repository"
        git(workdir, "commit", "--quiet", "--no-verify", "-m", message, "--", *paths)


def clone_url(remote: str) -> str:
    """``remote`` as a URL readers on other hosts can clone: a local path becomes ``file://...``."""
    path = local_path(remote)
    return path.as_uri() if path is not None and "://" not in remote else remote


def local_path(remote: str) -> Path | None:
    """The folder of a local git remote (``file://...`` or a path); None for a network URL."""
    if remote.startswith("file://"):
        return Path(urlparse(remote).path)
    if "://" in remote or re.match(r"^[\w.-]+@[\w.-]+:", remote):
        return None
    return Path(remote).absolute()
