"""The registry's MLflow adapter: reads a model's aliases, version tags and runs; writes what a plan says.

The registry is the only writer of aliases and version tags (DESIGN.md "Ownership"); the trainer registers
versions (with the alias ``candidate``) and writes runs. MLflow's client is synchronous: call these from a
worker thread.

Version tags the registry writes:

- ``rejected`` / ``retired`` (state, ``stages.REJECTED`` / ``RETIRED``): the value says why and when;
- ``conveyor.gates`` (the gate report as JSON) and ``conveyor.gates_passed`` (``true``/``false``);
- ``conveyor.artifacts``: file name -> sha256 as ``model.trained`` announced them, so a later promotion
  carries exactly what the trainer published;
- ``conveyor.audit.<seq>``: the audit entry of each change of the version, its sequence in the audit stream
  (actor, time, from -> to, reason, causing event id; the gate report is in ``conveyor.gates``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from contracts.audit import AuditEntry
from contracts.events import ArtifactRef, GateResult, TrainMetrics
from contracts.kv import STAGES
from services.registry.stages import REJECTED, RETIRED, Aliases, Transition

__all__ = ["ModelState", "ModelStore", "UnknownModel", "VersionInfo"]

STATE_TAGS = (REJECTED, RETIRED)
GATES_TAG = "conveyor.gates"
GATES_PASSED_TAG = "conveyor.gates_passed"
ARTIFACTS_TAG = "conveyor.artifacts"
AUDIT_TAG = "conveyor.audit."
MODEL_DIR = "model"
_TAG_LIMIT = 5000  # MLflow's limit on a tag value


class UnknownModel(LookupError):
    """No registered model of that name."""


@dataclass(frozen=True)
class VersionInfo:
    version: int
    run_id: str
    tags: dict[str, str]
    created_at: datetime

    @property
    def state_tags(self) -> set[str]:
        return {t for t in STATE_TAGS if t in self.tags}

    @property
    def dataset(self) -> tuple[str, int] | None:
        """(dataset, version) the version was trained on, from the trainer's ``dataset`` tag."""
        name, _, number = self.tags.get("dataset", "").rpartition("@")
        return (name, int(number)) if name and number.isdigit() else None

    @property
    def gate_report(self) -> list[GateResult]:
        raw = self.tags.get(GATES_TAG)
        return [GateResult.model_validate(g) for g in json.loads(raw)] if raw else []


@dataclass
class ModelState:
    """Everything the stage planner needs of one model: its aliases and each version's state tags."""

    model: str
    aliases: Aliases
    versions: dict[int, VersionInfo] = field(default_factory=dict)

    @property
    def tags(self) -> dict[int, set[str]]:
        return {v: info.state_tags for v, info in self.versions.items()}


class ModelStore:
    def __init__(self, tracking_uri: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def models(self) -> list[str]:
        names, token = [], None
        while True:
            page = self.client.search_registered_models(max_results=1000, page_token=token)
            names += [m.name for m in page]
            token = page.token
            if not token:
                return sorted(names)

    def state(self, model: str) -> ModelState:
        """The model's aliases and versions; ``UnknownModel`` when it has none registered."""
        try:
            registered = self.client.get_registered_model(model)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise UnknownModel(model) from exc
            raise
        aliases: Aliases = {
            alias: int(version) for alias, version in (registered.aliases or {}).items() if alias in STAGES
        }
        versions = {}
        for mv in self.client.search_model_versions(f"name='{model}'"):
            info = VersionInfo(
                version=int(mv.version),
                run_id=str(mv.run_id),
                tags=dict(mv.tags or {}),
                created_at=datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, UTC),
            )
            versions[info.version] = info
        if not versions:
            raise UnknownModel(model)
        return ModelState(model, aliases, versions)

    def apply(self, model: str, change: Transition, entry: AuditEntry, seq: int) -> None:
        """Write a planned change: aliases, state tags, and the audit entry mirrored as a version tag.

        Every write is idempotent, so a change re-applied after a crash ends in the same state.
        """
        for stage, version in change.set_aliases.items():
            _upsert(self.client.set_registered_model_alias, model, stage, str(version))
        for stage in change.remove_aliases:
            try:
                self.client.delete_registered_model_alias(model, stage)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        why = f"{entry.time.isoformat()} by {entry.actor}: {entry.reason}"
        for version, tags in change.add_tags.items():
            for tag in tags:
                self._set_tag(model, version, tag, why)
        for version, tags in change.remove_tags.items():
            for tag in tags:
                self._delete_tag(model, version, tag)
        if entry.version is not None:
            self.mirror(entry, seq)

    def mirror(self, entry: AuditEntry, seq: int) -> None:
        """The audit entry as a tag of its version (the gate report is left to ``conveyor.gates``)."""
        assert entry.version is not None
        doc = entry.model_dump(mode="json", exclude={"gate_report", "model", "version"}, exclude_none=True)
        self._set_tag(entry.model, entry.version, f"{AUDIT_TAG}{seq}", json.dumps(doc))

    def record_gates(
        self, model: str, version: int, report: Iterable[GateResult], passed: bool, artifacts: dict[str, str]
    ) -> None:
        results = [r.model_dump(mode="json", exclude_none=True) for r in report]
        self._set_tag(model, version, GATES_TAG, json.dumps(results))
        self._set_tag(model, version, GATES_PASSED_TAG, str(passed).lower())
        self._set_tag(model, version, ARTIFACTS_TAG, json.dumps(artifacts))

    def artifacts(self, model: str, info: VersionInfo) -> dict[str, ArtifactRef]:
        """The version's files as ``model.trained`` announced them (from ``sha256.json`` if never gated)."""
        base = f"{self.client.get_run(info.run_id).info.artifact_uri}/{MODEL_DIR}"
        raw = info.tags.get(ARTIFACTS_TAG)
        if raw:
            shas = json.loads(raw)
        else:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="conveyor-registry-") as tmp:
                path = self.client.download_artifacts(info.run_id, f"{MODEL_DIR}/sha256.json", tmp)
                with open(path) as handle:
                    shas = json.load(handle)
        return {name: ArtifactRef(uri=f"{base}/{name}", sha256=sha) for name, sha in sorted(shas.items())}

    def run_metrics(self, info: VersionInfo) -> TrainMetrics | None:
        """The version's test metrics as the trainer logged them (None when they are missing)."""
        metrics = self.client.get_run(info.run_id).data.metrics
        if "test_accuracy" not in metrics or "test_macro_f1" not in metrics:
            return None
        # val_accuracy is set as evaluation.evaluate_on sets it for a challenger on one split.
        return TrainMetrics(
            val_accuracy=metrics["test_accuracy"],
            test_accuracy=metrics["test_accuracy"],
            test_macro_f1=metrics["test_macro_f1"],
        )

    def run_tags(self, info: VersionInfo) -> dict[str, str]:
        return dict(self.client.get_run(info.run_id).data.tags)

    def _set_tag(self, model: str, version: int, key: str, value: str) -> None:
        _upsert(self.client.set_model_version_tag, model, str(version), key, value[:_TAG_LIMIT])

    def _delete_tag(self, model: str, version: int, tag: str) -> None:
        try:
            self.client.delete_model_version_tag(model, str(version), tag)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise


def _upsert(write: Callable[..., None], *args: str) -> None:
    """An MLflow write that another registry replica may make at the same moment: MLflow's upsert of a tag
    or alias is a read then an insert, so the second writer can hit the unique key; the value is then
    there, and writing it again updates it."""
    for attempt in range(3):
        try:
            write(*args)
            return
        except MlflowException as exc:
            racing = (
                "UNIQUE constraint" in str(exc) or "duplicate key" in str(exc) or "IntegrityError" in str(exc)
            )
            if not racing or attempt == 2:
                raise
            time.sleep(0.05 * (attempt + 1))
