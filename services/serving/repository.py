"""The Triton model repository on disk, written only by serving.

    <root>/<model>/config.pbtxt          rendered by tritonconfig; lists the versions the routes need
    <root>/<model>/<N>/model.pt ...      the verified files of version N, ``serving_spec.json`` among them
    <root>/<model>/<N>/model.py          the Python backend's entry point (python backend only)
    <root>/<model>/<N>/.verified.json    file name -> sha256, as ``model.promoted`` announced them
    <root>/<model>/<N>/served.json       tensor name in the spec -> the name Triton serves it under (the
                                         gateway and the smoke test address tensors by these)

A version folder appears whole (written beside, then renamed) and the config is replaced atomically, so
Triton never reads half a version. Versions no route needs stay on disk (a rollback reloads them without a
download) until more than ``keep`` are there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from services.serving.tritonconfig import (
    PYTHON_MODEL,
    TritonOptions,
    model_file,
    render_config,
    served_tensors,
)

__all__ = ["ModelRepository", "served_names"]

VERIFIED = ".verified.json"
SPEC = "serving_spec.json"
SERVED = "served.json"
_VERSIONS = re.compile(r"versions:\s*\[([0-9,\s]*)\]")


class ModelRepository:
    def __init__(self, root: Path, options: TritonOptions) -> None:
        self.root, self.options = Path(root), options

    def version_dir(self, model: str, version: int) -> Path:
        return self.root / model / str(version)

    def has_version(self, model: str, version: int, shas: Mapping[str, str] | None = None) -> bool:
        """Version folder complete (and holding exactly these files' hashes, when given)."""
        marker = self.version_dir(model, version) / VERIFIED
        if not marker.is_file():
            return False
        return shas is None or json.loads(marker.read_text()) == dict(shas)

    def install(self, model: str, version: int, files: Path, shas: Mapping[str, str]) -> Path:
        """Move the verified files of ``version`` into place (replacing an older copy); its folder."""
        folder = self.root / model
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".incoming-{version}-"))
        for item in files.iterdir():
            shutil.move(str(item), staging / item.name)
        spec = json.loads((staging / SPEC).read_text())
        source, expected = model_file(self.options.backend, spec)
        if source != expected:
            shutil.copyfile(staging / source, staging / expected)
        if self.options.backend == "python":
            (staging / "model.py").write_text(PYTHON_MODEL)
        (staging / SERVED).write_text(json.dumps(served_tensors(self.options.backend, spec)))
        (staging / VERIFIED).write_text(json.dumps(dict(shas), sort_keys=True))
        target = self.version_dir(model, version)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        return target

    def spec(self, model: str, version: int) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((self.version_dir(model, version) / SPEC).read_text())
        return result

    def served(self, model: str, version: int) -> dict[str, str]:
        """The names Triton serves the spec's tensors under (``served.json``; a folder written before it
        existed was written for the Python backend, which serves the names as they are)."""
        return served_names(self.version_dir(model, version))

    def on_disk(self, model: str) -> list[int]:
        folder = self.root / model
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / VERIFIED).is_file())

    def listed(self, model: str) -> list[int]:
        """The versions the current config lists (empty without a config)."""
        config = self.root / model / "config.pbtxt"
        if not config.is_file():
            return []
        found = _VERSIONS.search(config.read_text())
        return sorted(int(v) for v in found.group(1).replace(",", " ").split()) if found else []

    def write_config(self, model: str, versions: Iterable[int]) -> list[int]:
        """List ``versions`` (those on disk) in the config; the spec of the newest sets the tensors."""
        listed = sorted(set(versions) & set(self.on_disk(model)))
        if not listed:
            raise ValueError(f"no version of {model} to serve is on disk")
        text = render_config(model, self.spec(model, listed[-1]), listed, self.options)
        config = self.root / model / "config.pbtxt"
        handle, tmp = tempfile.mkstemp(dir=config.parent, prefix=".config-")
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(tmp, config)
        return listed

    def prune(self, model: str, needed: Iterable[int], keep: int) -> list[int]:
        """Delete the oldest version folders no route needs while more than ``keep`` are on disk."""
        needed = set(needed)
        spare = [v for v in self.on_disk(model) if v not in needed]
        removed = spare[: max(0, len(spare) + len(needed) - keep)]
        for version in removed:
            shutil.rmtree(self.version_dir(model, version), ignore_errors=True)
        return removed


def served_names(version_dir: Path) -> dict[str, str]:
    """``served.json`` of a version folder, or the spec's own names where it is missing."""
    path = version_dir / SERVED
    if path.is_file():
        names: dict[str, str] = json.loads(path.read_text())
        return names
    spec = json.loads((version_dir / SPEC).read_text())
    return {str(t["name"]): str(t["name"]) for t in [*spec["inputs"], *spec["outputs"]]}
