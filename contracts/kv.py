"""The values kept in the two NATS KV buckets, both keyed by model name (``kv_key``).

- ``RolloutState`` (bucket ``Subjects.kv.rollout``): which versions of a model serve which traffic. Only the
  registry writes it; every gateway replica watches it, so they all route alike.
- ``ModelPolicy`` (bucket ``Subjects.kv.policy``): an operator's configuration of one model, applied with
  ``conveyor policy apply FILE``; every service reads it. ``ModelPolicy(model="digits")`` is complete.
"""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import pairwise
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from contracts.names import Name, validate_name

__all__ = [
    "KV_VALUES",
    "STAGES",
    "CanaryPolicy",
    "DriftPolicy",
    "GatePolicy",
    "Hyperparameters",
    "ModelPolicy",
    "RolloutPlan",
    "RolloutPolicy",
    "RolloutState",
    "SamplingPolicy",
    "Stage",
    "TrainingPolicy",
    "kv_key",
]

Stage = Literal["candidate", "staging", "canary", "champion", "shadow"]
"""A registry stage; each is an MLflow alias pointing at one version of a model."""
STAGES: tuple[Stage, ...] = ("candidate", "staging", "canary", "champion", "shadow")


def kv_key(model: str) -> str:
    """The key of a model's entry in either bucket: the model name, which the name rule keeps a valid key."""
    return validate_name(model)


class RolloutState(BaseModel):
    """How the gateway routes a model's traffic. Written only by the registry; read by every gateway replica.

    Unknown fields are ignored so that a gateway keeps routing while a newer registry adds one.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: Name
    active_version: int | None = Field(
        None, ge=1, description="the champion: serves all traffic not sent to the canary (blue/green switch)"
    )
    canary_version: int | None = Field(None, ge=1)
    canary_weight: int = Field(0, ge=0, le=100, description="percent of requests routed to the canary")
    shadow_version: int | None = Field(
        None, ge=1, description="receives a mirror of each request; its answers are compared, never returned"
    )
    revision: int = Field(0, ge=0, description="increases with every write, so readers can drop stale values")
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    updated_by: str = Field("registry", description="who asked for the change (a user for manual routes)")
    reason: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RolloutState:
        if self.canary_weight and self.canary_version is None:
            raise ValueError("canary_weight is above 0 but no canary_version is set")
        if self.canary_version is not None and self.canary_version == self.active_version:
            raise ValueError(
                f"version {self.canary_version} cannot be both the active and the canary version"
            )
        return self


class _Policy(BaseModel):
    # Operator-written YAML: a misspelt key must be an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingPolicy(_Policy):
    """When the trainer trains this model."""

    trigger: Literal["on_new_data", "on_drift", "manual"] = Field(
        "on_new_data",
        description="on_new_data: every new dataset version; on_drift: a drift.detected with newer data; "
        "manual: only `conveyor train` (train.requested)",
    )
    retrain_cooldown_s: float = Field(
        3600.0, ge=0, description="minimum time between drift-triggered trainings"
    )


class Hyperparameters(_Policy):
    """What the trainer trains with; fixed seeds make a rerun on the same data and device reproducible."""

    architecture: Literal["small_cnn", "resnet"] = "small_cnn"
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    image_size: int = Field(32, ge=8, le=4096, description="images are resized to image_size x image_size")
    seed: int = Field(0, ge=0)
    early_stopping_patience: int = Field(
        3, ge=0, description="epochs without validation improvement before stopping; 0 turns it off"
    )


class GatePolicy(_Policy):
    """What the registry requires of a new version before it leaves ``candidate``."""

    min_test_accuracy: float = Field(0.9, ge=0, le=1)
    max_regression: dict[str, float] = Field(
        default_factory=lambda: {"test_accuracy": 0.01, "test_macro_f1": 0.01},
        description="per metric, how much a challenger may fall below the champion on the same test split",
    )
    latency_budget_ms: float = Field(
        50.0, gt=0, description="batch-1 inference latency the smoke load must meet"
    )

    @field_validator("max_regression")
    @classmethod
    def _epsilons(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {metric: eps for metric, eps in value.items() if not 0 <= eps <= 1}
        if bad:
            raise ValueError(f"regression epsilons must be within 0..1, got {bad}")
        return value


class RolloutPlan(BaseModel):
    """How a canary is ramped up; carried in ``model.promoted`` so every service sees the same plan."""

    # It travels in events too, where unknown fields must be ignored; RolloutPolicy forbids them again.
    model_config = ConfigDict(extra="ignore", frozen=True)

    canary_weights: list[int] = Field(
        default_factory=lambda: [10, 50],
        description="percent of traffic at each canary step, increasing; empty: no canary, switch blue/green",
    )
    min_requests: int = Field(
        200, ge=1, description="requests the canary must serve at a step before a verdict"
    )
    min_seconds: float = Field(
        60.0, ge=0, description="time the canary must spend at a step before a verdict"
    )

    @field_validator("canary_weights")
    @classmethod
    def _increasing_percentages(cls, value: list[int]) -> list[int]:
        if any(not 0 < w <= 100 for w in value):
            raise ValueError(f"canary weights are percentages within 1..100, got {value}")
        if any(a >= b for a, b in pairwise(value)):
            raise ValueError(f"canary weights must increase step by step, got {value}")
        return value


class RolloutPolicy(RolloutPlan):
    """The rollout plan plus the registry's promotion rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    first_to_champion: bool = Field(
        True, description="the first version of a model that passes the gates becomes champion at once"
    )
    required_stages: tuple[Literal["staging", "canary"], ...] = Field(
        ("staging", "canary"),
        description="stages a version must pass through before champion (manual promotions included)",
    )

    @model_validator(mode="after")
    def _canary_needs_steps(self) -> RolloutPolicy:
        if "canary" in self.required_stages and not self.canary_weights:
            raise ValueError("required_stages includes 'canary' but canary_weights is empty")
        return self

    def plan(self) -> RolloutPlan:
        """The part of this policy that travels in ``model.promoted``."""
        return RolloutPlan(
            canary_weights=self.canary_weights, min_requests=self.min_requests, min_seconds=self.min_seconds
        )


class SamplingPolicy(_Policy):
    """How much live traffic is logged for the monitor and traced."""

    inference_log_rate: float = Field(
        1.0, ge=0, le=1, description="fraction of predictions in inference.logged"
    )
    trace_sample_rate: float = Field(0.01, ge=0, le=1, description="fraction of predict requests traced")


class DriftPolicy(_Policy):
    """The monitor's windows and thresholds for this model."""

    window_size: int = Field(1000, ge=10, description="samples per window")
    window_seconds: float = Field(300.0, gt=0, description="a window also closes after this long")
    min_samples: int = Field(200, ge=10, description="no verdict on a window with fewer samples")
    psi_threshold: float = Field(
        0.2, gt=0, description="PSI above this on predictions or confidence is drift"
    )
    ks_p_value: float = Field(
        0.01, gt=0, lt=1, description="KS p-value below this on image statistics is drift"
    )
    mmd_p_value: float = Field(0.01, gt=0, lt=1, description="MMD p-value below this on embeddings is drift")
    cooldown_s: float = Field(900.0, ge=0, description="at most one drift.detected per model in this time")

    @model_validator(mode="after")
    def _window_holds_minimum(self) -> DriftPolicy:
        if self.min_samples > self.window_size:
            raise ValueError(f"min_samples ({self.min_samples}) exceeds window_size ({self.window_size})")
        return self


class CanaryPolicy(_Policy):
    """How the monitor judges a canary step against the champion's traffic in the same step (the minimum
    traffic before a verdict is the rollout plan's ``min_requests`` and ``min_seconds``)."""

    max_error_rate_increase: float = Field(
        0.01, ge=0, le=1, description="the canary's error rate may exceed the champion's by this much"
    )
    max_latency_p99_ratio: float = Field(
        1.5, ge=1, description="the canary's p99 latency may be this many times the champion's ..."
    )
    latency_slack_ms: float = Field(
        5.0, ge=0, description="... plus this, so sub-millisecond noise never fails"
    )
    max_disagreement: float = Field(
        0.1, ge=0, le=1, description="share of shadowed requests where canary and champion answer differently"
    )
    max_accuracy_drop: float = Field(
        0.05, ge=0, le=1, description="live accuracy (feedback labels) below the champion's by more fails"
    )
    min_feedback: int = Field(20, ge=1, description="feedback labels per version before accuracy is judged")
    max_confidence_drop: float = Field(
        0.1, ge=0, le=1, description="the canary's mean confidence below the champion's by more fails"
    )


class ModelPolicy(_Policy):
    """An operator's configuration of one model; every field but ``model`` has a default."""

    model: Name
    dataset: Name | None = Field(None, description="the dataset this model trains on; unset: the same name")
    training: TrainingPolicy = Field(default_factory=TrainingPolicy)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    gates: GatePolicy = Field(default_factory=GatePolicy)
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)
    sampling: SamplingPolicy = Field(default_factory=SamplingPolicy)
    drift: DriftPolicy = Field(default_factory=DriftPolicy)
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)

    @property
    def dataset_name(self) -> str:
        return self.dataset or self.model


KV_VALUES: dict[str, type[BaseModel]] = {"rollout_state": RolloutState, "model_policy": ModelPolicy}
"""Schema name -> model of each KV value (the schema snapshots are ``contracts/schemas/<name>.json``)."""
