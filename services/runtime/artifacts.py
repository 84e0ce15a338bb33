"""Fetching a model version's exported files from MLflow, verified against the sha256s the trainer published.

Shared by the registry (its gates) and serving (the Triton repository); imports no torch.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from contracts.events import ArtifactRef

__all__ = [
    "MODEL_DIR",
    "ArtifactClient",
    "ArtifactMismatch",
    "download_model_dir",
    "download_refs",
    "download_registered",
]

MODEL_DIR = "model"
"""The folder of a run's artifacts that holds the exported model (the trainer's ``MODEL_DIR``)."""


class ArtifactMismatch(ValueError):
    """Downloaded model files are missing or differ from the sha256 the trainer published."""


class ArtifactClient(Protocol):
    """What ``download_model_dir`` needs of an ``mlflow.MlflowClient``."""

    def download_artifacts(self, run_id: str, path: str, dst_path: str | None = None) -> str: ...


def download_model_dir(
    mlflow_client: ArtifactClient,
    run_id: str,
    dest: Path,
    expected: Mapping[str, str | ArtifactRef],
) -> Path:
    """Download the run's ``model/`` folder into ``dest`` and return it (``dest/model``).

    ``expected`` maps file names in that folder (the keys of ``model.trained``'s ``artifacts``) to their
    sha256 (or the ``ArtifactRef``). Every one must be there with that hash, else ``ArtifactMismatch`` lists
    each missing or differing file, and the downloaded folder is deleted so nothing unverified stays behind.
    Files not named in ``expected`` (such as ``sha256.json``) are not checked. A ``dest/model`` left from an
    earlier call is replaced.
    """
    if not expected:
        raise ValueError("no sha256 to verify the model's files against")
    wanted = {name: ref.sha256 if isinstance(ref, ArtifactRef) else ref for name, ref in expected.items()}
    for name in wanted:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"artifact name {name!r} is not a path inside the model folder")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest / MODEL_DIR, ignore_errors=True)
    local = Path(mlflow_client.download_artifacts(run_id, MODEL_DIR, str(dest)))
    problems = []
    for name, sha in sorted(wanted.items()):
        path = local / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        with path.open("rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest()
        if actual != sha.lower():
            problems.append(f"{name}: sha256 {actual}, expected {sha}")
    if problems:
        shutil.rmtree(local, ignore_errors=True)
        raise ArtifactMismatch(
            f"the model/ artifacts of run {run_id} do not match what the trainer published "
            f"({len(problems)} file(s)): " + "; ".join(problems)
        )
    return local


def download_refs(refs: Mapping[str, ArtifactRef], dest: Path, tracking_uri: str) -> Path:
    """Download each file of ``refs`` (name -> its URI and sha256, as in ``model.promoted``) into ``dest``
    and check its sha256; ``ArtifactMismatch`` lists every file missing or differing (and ``dest`` is
    emptied). Returns ``dest``."""
    import mlflow.artifacts

    for name in refs:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or len(parts) != 1:
            raise ValueError(f"artifact name {name!r} is not a file name")
    dest.mkdir(parents=True, exist_ok=True)
    problems = []
    for name, ref in sorted(refs.items()):
        try:
            got = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=ref.uri, dst_path=str(dest), tracking_uri=tracking_uri
                )
            )
        except Exception as exc:  # the store answered no: name the file and why
            problems.append(f"{name}: cannot download {ref.uri}: {str(exc).splitlines()[0][:200]}")
            continue
        if got.name != name:
            got.replace(dest / name)
        with (dest / name).open("rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest()
        if actual != ref.sha256.lower():
            problems.append(f"{name}: sha256 {actual}, expected {ref.sha256}")
    if problems:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArtifactMismatch(
            f"{len(problems)} model file(s) do not match what the trainer published: " + "; ".join(problems)
        )
    return dest


def download_registered(
    tracking_uri: str, model: str, version: int, dest: Path
) -> tuple[Path, dict[str, str]]:
    """The ``model/`` folder of a registered version, found through the MLflow registry (the version's run)
    and checked against the ``sha256.json`` the trainer logged beside the files: for a version that no
    ``model.promoted`` announced (a route set by hand). Returns the folder and its files' hashes;
    ``ArtifactMismatch`` when the version, its run or a file is missing or differs."""
    import json

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run_id = client.get_model_version(model, str(version)).run_id
    except Exception as exc:
        raise ArtifactMismatch(f"{model} version {version} is not in the MLflow registry: {exc}") from exc
    if not run_id:
        raise ArtifactMismatch(f"{model} version {version} has no run to download its files from")
    try:
        listed = client.download_artifacts(run_id, f"{MODEL_DIR}/sha256.json", str(dest / "sha256"))
    except Exception as exc:
        raise ArtifactMismatch(
            f"the run {run_id} of {model}@{version} has no {MODEL_DIR}/sha256.json"
        ) from exc
    shas: dict[str, str] = json.loads(Path(listed).read_text())
    return download_model_dir(client, run_id, dest / "files", shas), shas
