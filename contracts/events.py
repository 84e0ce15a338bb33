"""One model per event type: the ``data`` of the CloudEvents envelope (see ``contracts.envelope``).

Events grow only by optional fields; a breaking change is a new ``<type>.v2`` with an upcaster. Each class
says who publishes it and who consumes it; the AsyncAPI document (``docs/asyncapi.yaml``) is generated from
them.
Free-text ``reason_code`` fields are strings, not enums, so that a producer can add a code without breaking
older consumers; their docs list the codes in use.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.envelope import Event
from contracts.kv import RolloutPlan, Stage
from contracts.names import Name

__all__ = [
    "EVENTS",
    "UNKNOWN_DATASET",
    "ArtifactRef",
    "CanaryVerdict",
    "ClassMetrics",
    "DatasetRef",
    "DatasetRejected",
    "DatasetVersioned",
    "DriftCleared",
    "DriftDetected",
    "DriftTest",
    "Duplicate",
    "Feedback",
    "GateResult",
    "ImageStats",
    "InferenceLogged",
    "InferenceSample",
    "ModelDeployFailed",
    "ModelDeployed",
    "ModelPromoted",
    "ModelRejected",
    "ModelRolledBack",
    "ModelTrained",
    "ModelTrainingFailed",
    "ShadowResult",
    "SplitCounts",
    "TrainMetrics",
    "TrainRequested",
]

Version = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

UNKNOWN_DATASET = "unknown"
"""The dataset a ``dataset.rejected`` names when the object key names no valid dataset."""


class Part(BaseModel):
    """Base of the models nested in events: ignores unknown fields like ``Event`` does."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class ArtifactRef(Part):
    uri: str = Field(description="where the file is, e.g. mlflow-artifacts:/... or s3://...")
    sha256: Sha256


class DatasetRef(Part):
    """One dataset version, exactly: serving the same name and version always means the same files."""

    name: Name
    version: Version
    git_rev: str = Field(description="commit of the version's tag <dataset>/v<N> in the data repository")
    dvc_md5: str = Field(description="md5 DVC recorded for the dataset directory")


class SplitCounts(Part):
    train: Count
    val: Count
    test: Count


class Duplicate(Part):
    md5: str
    keys: list[str] = Field(description="object keys with identical content under different labels")


class GateResult(Part):
    """One gate or check with its measured value, its threshold and the verdict."""

    name: str = Field(
        description="e.g. min_test_accuracy, regression.test_macro_f1, smoke_load, latency_p50_ms"
    )
    value: float | None = Field(None, description="measured value; None for a pass/fail check such as a load")
    threshold: float | None = None
    passed: bool
    detail: str | None = Field(None, description="why it failed, in words an operator can act on")


class ClassMetrics(Part):
    precision: Fraction
    recall: Fraction
    f1: Fraction
    support: Count


class TrainMetrics(Part):
    val_accuracy: Fraction
    test_accuracy: Fraction
    test_macro_f1: Fraction
    per_class: dict[str, ClassMetrics] = Field(default_factory=dict, description="test split, by label")


class DriftTest(Part):
    name: str = Field(description="test and feature, e.g. psi.prediction, ks.brightness, mmd.embedding")
    statistic: float
    p_value: float | None = Field(None, description="None for tests without one (PSI)")
    threshold: float = Field(description="the statistic or p-value limit from the model's drift policy")
    drifted: bool


class ImageStats(Part):
    mean: float
    std: float
    contrast: float
    sharpness: float


class ShadowResult(Part):
    version: Version
    label: str | None = None
    confidence: Fraction | None = None
    agrees: bool | None = Field(None, description="same label as the answer returned; None when it failed")
    latency_ms: float | None = None


class InferenceSample(Part):
    """One sampled prediction as the gateway answered it."""

    prediction_id: str
    time: datetime
    version: Version
    route: Literal["active", "canary"] = Field(description="which rollout route answered (see RolloutState)")
    latency_ms: float = Field(ge=0)
    ok: bool = True
    error: str | None = None
    label: str | None = Field(None, description="predicted label; None when the request failed")
    confidence: Fraction | None = None
    image_stats: ImageStats | None = None
    embedding: list[float] | None = None
    shadow: ShadowResult | None = None


class Feedback(Part):
    """A true label sent back for an earlier prediction."""

    prediction_id: str
    time: datetime
    version: Version
    predicted_label: str | None = None
    true_label: str


# ---- dataset -------------------------------------------------------------------------------------------


class DatasetVersioned(Event):
    """A dataset version was committed, tagged and pushed. Published by ingest; consumed by the trainer."""

    type: ClassVar[str] = "dataset.versioned"
    subject_field: ClassVar[str] = "dataset"
    key_fields: ClassVar[tuple[str, ...]] = ("dataset", "version")

    dataset: Name
    version: Version
    git_rev: str = Field(description="commit of the tag <dataset>/v<N> in the data repository")
    dvc_md5: str = Field(description="md5 DVC recorded for the dataset directory (also the content hash)")
    repo_url: str = Field(
        description="git remote of the data repository, readable by trainers on other hosts"
    )
    remote_url: str = Field(description="the DVC remote holding the files")
    label_counts: dict[str, Count] = Field(description="files per label in this version")
    split_counts: SplitCounts = Field(description="files per split; splits are assigned by content hash")
    total_bytes: Count
    added: Count = Field(description="files new since the previous version")
    removed: Count = Field(description="files gone since the previous version")
    rejected: Count = Field(description="files of this batch quarantined (each has a dataset.rejected)")
    duplicates: list[Duplicate] = Field(
        default_factory=list, description="identical files under different labels, left out of the version"
    )
    source_digest: str = Field(description="sha256 over the sorted (key, etag) of the source objects")
    ingest_seconds: float = Field(ge=0, description="from the batch closing to the version being pushed")


class DatasetRejected(Event):
    """A file was quarantined and left out of its dataset. Published by ingest; read by operators.

    Keys that name no valid dataset are reported under the dataset ``unknown``.
    """

    type: ClassVar[str] = "dataset.rejected"
    subject_field: ClassVar[str] = "dataset"
    key_fields: ClassVar[tuple[str, ...]] = ("dataset", "key", "etag")

    dataset: Name
    bucket: str
    key: str = Field(description="the object key as uploaded")
    etag: str
    reason_code: str = Field(
        description="bad_key, bad_layout, bad_name, empty, too_large, too_many_pixels, undecodable, "
        "unsupported_format"
    )
    reason: str
    quarantine_uri: str = Field(description="where the file and a JSON reason next to it were copied")
    size_bytes: Count | None = None


# ---- training ------------------------------------------------------------------------------------------


class TrainRequested(Event):
    """Someone asked for a training (``conveyor train DATASET[@N]``).

    Published by the CLI on an operator's behalf; consumed by the trainer.
    """

    type: ClassVar[str] = "train.requested"
    subject_field: ClassVar[str] = "dataset"
    key_fields: ClassVar[tuple[str, ...]] = ("dataset", "request_id")

    dataset: Name
    version: Version | None = Field(None, description="None: the newest version")
    model: Name | None = Field(None, description="None: the model(s) whose policy trains on this dataset")
    request_id: str = Field(
        min_length=1, description="unique per request; a resend of one request is dropped"
    )
    requested_by: str
    reason: str | None = None


class ModelTrained(Event):
    """A model version was trained, exported and registered with alias ``candidate``.

    Published by the trainer; consumed by the registry, which gates it.
    """

    type: ClassVar[str] = "model.trained"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "version")

    model: Name
    version: Version = Field(description="MLflow model version, also the Triton version")
    run_id: str = Field(description="MLflow run")
    dataset: DatasetRef
    metrics: TrainMetrics
    artifacts: dict[str, ArtifactRef] = Field(
        description="by path in the run: model.pt, model.onnx, serving_spec.json, reference_profile.json, "
        "model_card.md"
    )
    training_seconds: float = Field(ge=0)
    device: str = Field(description="e.g. cpu, cuda:0 (NVIDIA H200)")


class ModelTrainingFailed(Event):
    """A training failed; its MLflow run, if any, is marked failed.

    Published by the trainer; read by operators and integrators.
    """

    type: ClassVar[str] = "model.training_failed"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "cause_id")

    model: Name
    dataset: Name
    dataset_version: Version | None = None
    run_id: str | None = Field(None, description="None when it failed before a run was started")
    reason_code: str = Field(description="too_few_labels, too_few_images, out_of_memory, data_error, crash")
    reason: str
    cause_id: str = Field(description="id of the event that asked for the training")


# ---- registry ------------------------------------------------------------------------------------------


class ModelPromoted(Event):
    """A model version moved to a stage (an MLflow alias). Published by the registry; consumed by serving."""

    type: ClassVar[str] = "model.promoted"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "version", "to_stage", "transition")

    model: Name
    version: Version
    from_stage: Stage | None = None
    to_stage: Stage
    transition: Version = Field(description="sequence of this transition in the model's audit log")
    reason: str
    actor: str = Field(description="registry for automatic transitions, else the user who asked")
    gate_report: list[GateResult] = Field(default_factory=list)
    artifacts: dict[str, ArtifactRef] = Field(
        description="as published in model.trained; serving verifies them"
    )
    rollout_plan: RolloutPlan


class ModelRejected(Event):
    """A model version failed its gates and is tagged ``rejected``.

    Published by the registry; read by operators and integrators.
    """

    type: ClassVar[str] = "model.rejected"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "version")

    model: Name
    version: Version
    reason: str
    gate_report: list[GateResult] = Field(
        description="every gate evaluated; the failing ones have passed=false"
    )


class ModelRolledBack(Event):
    """A stage went back to an earlier version. Published by the registry; read by operators and integrators.

    The gateway follows the rollout state in KV, which the registry changes in the same transition.
    """

    type: ClassVar[str] = "model.rolled_back"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "transition")

    model: Name
    stage: Stage = Field(description="the stage rolled back: canary (a failed canary) or champion")
    from_version: Version
    to_version: Version | None = Field(None, description="the previous champion; None when there is none")
    transition: Version
    reason: str
    actor: str
    cause_id: str | None = Field(
        None, description="id of the event that caused it, e.g. a failing canary.verdict"
    )


# ---- serving -------------------------------------------------------------------------------------------


class ModelDeployed(Event):
    """A promoted version is loaded in Triton and passed its smoke inference.

    Published by serving; consumed by the registry, which starts or steps up the canary.
    """

    type: ClassVar[str] = "model.deployed"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "version", "transition")

    model: Name
    version: Version
    stage: Stage
    transition: Version = Field(description="the model.promoted transition this answers")
    backend: str = Field(description="python (TorchScript), pytorch_libtorch or onnxruntime")
    loaded_versions: list[Version] = Field(description="every version of the model Triton now serves")
    load_seconds: float = Field(ge=0)
    smoke_latency_ms: float | None = None


class ModelDeployFailed(Event):
    """A promoted version could not be served; the versions already loaded keep serving. Published by serving;
    consumed by the registry."""

    type: ClassVar[str] = "model.deploy_failed"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "version", "transition")

    model: Name
    version: Version
    stage: Stage
    transition: Version
    reason_code: str = Field(description="download_failed, hash_mismatch, load_failed, smoke_failed, timeout")
    reason: str
    serving_versions: list[Version] = Field(default_factory=list, description="versions still serving")


class InferenceLogged(Event):
    """A batch of sampled predictions and feedback labels.

    Published by the gateway (serving); consumed by the monitor.
    """

    type: ClassVar[str] = "inference.logged"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "batch_id")

    model: Name
    batch_id: str = Field(min_length=1, description="unique per batch and gateway worker")
    sample_rate: Fraction = Field(description="fraction of predictions sampled into this batch")
    samples: list[InferenceSample] = Field(default_factory=list)
    feedback: list[Feedback] = Field(default_factory=list)


# ---- monitor -------------------------------------------------------------------------------------------


class CanaryVerdict(Event):
    """A canary step was judged once it had the policy's minimum traffic. Published by the monitor (or
    ``conveyor canary-verdict`` by hand); consumed by the registry, which steps up, promotes or rolls back."""

    type: ClassVar[str] = "canary.verdict"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "version", "weight")

    model: Name
    version: Version = Field(description="the canary")
    champion_version: Version | None = None
    weight: int = Field(ge=0, le=100, description="canary weight in percent during the judged step")
    verdict: Literal["pass", "fail"]
    requests: Count = Field(description="canary requests judged")
    checks: list[GateResult] = Field(
        default_factory=list,
        description="error_rate, latency_p99_ms, disagreement, live_accuracy, confidence_shift against the "
        "champion; empty for a verdict given by hand",
    )
    reason: str | None = None


class DriftDetected(Event):
    """Live traffic of a model version drifted from its reference profile.

    Published by the monitor, at most once per cooldown; consumed by the trainer (``on_drift`` policy) and
    read by operators.
    """

    type: ClassVar[str] = "drift.detected"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "version", "window_end")

    model: Name
    version: Version
    window_start: datetime
    window_end: datetime
    sample_count: Count
    severity: Literal["low", "medium", "high"] = Field(
        description="high: three or more tests drifted, or a PSI above twice its threshold; medium: two; "
        "low: one"
    )
    tests: list[DriftTest] = Field(
        description="every test run on the window; the drifting ones have drifted=true"
    )
    live_accuracy: Fraction | None = Field(
        None, description="accuracy on the window's feedback labels; None when none came back"
    )


class DriftCleared(Event):
    """A model version that drifted has a window without drift again. Published by the monitor; read by
    operators and integrators (it closes what ``drift.detected`` opened)."""

    type: ClassVar[str] = "drift.cleared"
    subject_field: ClassVar[str] = "model"
    key_fields: ClassVar[tuple[str, ...]] = ("model", "version", "window_end")

    model: Name
    version: Version
    window_start: datetime
    window_end: datetime
    sample_count: Count
    drifted_since: datetime | None = Field(None, description="end of the window whose drift was reported")
    tests: list[DriftTest] = Field(description="every test run on the clean window")


EVENTS: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        DatasetVersioned,
        DatasetRejected,
        TrainRequested,
        ModelTrained,
        ModelTrainingFailed,
        ModelPromoted,
        ModelRejected,
        ModelDeployed,
        ModelDeployFailed,
        ModelRolledBack,
        InferenceLogged,
        CanaryVerdict,
        DriftDetected,
        DriftCleared,
    )
}
"""Event type -> model, for every current event type."""
