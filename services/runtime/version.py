"""The code version a service reports (MLflow tags, model cards): the package version plus the git commit."""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["code_version"]


@functools.cache
def code_version() -> str:
    try:
        release = version("conveyor")
    except PackageNotFoundError:
        release = "0+unknown"
    source = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return release
    if out.returncode != 0:
        return release
    dirty = subprocess.run(
        ["git", "-C", str(source), "status", "--porcelain"], capture_output=True, text=True
    )
    return f"{release}+g{out.stdout.strip()}{'.dirty' if dirty.stdout.strip() else ''}"
