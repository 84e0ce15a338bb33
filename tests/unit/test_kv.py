"""The KV value schemas: policy defaults and clear validation errors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from contracts import KV_VALUES, ModelPolicy, RolloutState, kv_key
from contracts.kv import RolloutPlan

pytestmark = pytest.mark.unit


def test_policy_defaults() -> None:
    policy = ModelPolicy(model="digits")
    assert policy.dataset_name == "digits"
    assert policy.training.trigger == "on_new_data"
    assert policy.hyperparameters.architecture == "small_cnn"
    assert policy.gates.min_test_accuracy == 0.9
    assert policy.rollout.canary_weights == [10, 50]
    assert policy.rollout.first_to_champion
    assert 0 < policy.sampling.trace_sample_rate <= policy.sampling.inference_log_rate <= 1
    assert policy.drift.min_samples <= policy.drift.window_size
    assert policy.rollout.plan() == RolloutPlan(canary_weights=[10, 50], min_requests=200, min_seconds=60)


def test_policy_from_yaml_shaped_dict() -> None:
    policy = ModelPolicy.model_validate(
        {
            "model": "cells",
            "dataset": "cells-2025",
            "training": {"trigger": "on_drift"},
            "hyperparameters": {"architecture": "resnet", "image_size": 224, "epochs": 5},
            "rollout": {"canary_weights": [5, 25, 100], "required_stages": ["staging"]},
        }
    )
    assert policy.dataset_name == "cells-2025"
    assert policy.hyperparameters.batch_size == 64  # untouched defaults stay
    assert policy.rollout.canary_weights == [5, 25, 100]


def _error(data: dict[str, Any], model: type[BaseModel] = ModelPolicy) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": "Digits"}, "invalid name"),
        ({"model": "d", "rollout": {"canary_weights": [50, 10]}}, "must increase"),
        ({"model": "d", "rollout": {"canary_weights": [10, 10]}}, "must increase"),
        ({"model": "d", "rollout": {"canary_weights": [0, 50]}}, "within 1..100"),
        ({"model": "d", "rollout": {"canary_weights": [10, 150]}}, "within 1..100"),
        ({"model": "d", "rollout": {"canary_weights": []}}, "canary_weights is empty"),
        ({"model": "d", "sampling": {"inference_log_rate": 1.5}}, "less than or equal to 1"),
        ({"model": "d", "sampling": {"trace_sample_rate": -0.1}}, "greater than or equal to 0"),
        ({"model": "d", "gates": {"max_regression": {"test_accuracy": 2}}}, "within 0..1"),
        ({"model": "d", "gates": {"min_test_accuracy": 1.2}}, "gates.min_test_accuracy"),
        ({"model": "d", "training": {"trigger": "nightly"}}, "on_new_data"),
        ({"model": "d", "hyperparameters": {"architecture": "vit"}}, "small_cnn"),
        ({"model": "d", "hyperparameters": {"epoch": 3}}, "hyperparameters.epoch"),
        ({"model": "d", "drift": {"window_size": 100, "min_samples": 500}}, "exceeds window_size"),
        ({"model": "d", "rollout": {"required_stages": ["champion"]}}, "required_stages"),
    ],
)
def test_policy_validation_errors(data: dict[str, Any], message: str) -> None:
    assert message in _error(data)


def test_no_canary_means_blue_green() -> None:
    policy = ModelPolicy.model_validate(
        {"model": "d", "rollout": {"canary_weights": [], "required_stages": ["staging"]}}
    )
    assert policy.rollout.plan().canary_weights == []


def test_rollout_state() -> None:
    state = RolloutState(model="digits", active_version=2, canary_version=3, canary_weight=10, revision=4)
    assert RolloutState.model_validate_json(state.model_dump_json()) == state
    assert RolloutState(model="digits").canary_weight == 0
    # A newer registry may add fields; gateways keep reading.
    assert RolloutState.model_validate({"model": "digits", "sticky_header": "x"}).model == "digits"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": "d", "canary_weight": 101, "canary_version": 2}, "less than or equal to 100"),
        ({"model": "d", "canary_weight": -1}, "greater than or equal to 0"),
        ({"model": "d", "canary_weight": 10}, "no canary_version"),
        ({"model": "d", "active_version": 2, "canary_version": 2}, "both the active and the canary"),
        ({"model": "d", "active_version": 0}, "greater than or equal to 1"),
    ],
)
def test_rollout_state_validation(data: dict[str, Any], message: str) -> None:
    assert message in _error(data, RolloutState)


def test_kv_key_and_registry() -> None:
    assert kv_key("digits") == "digits"
    with pytest.raises(ValueError):
        kv_key("a.b")
    assert KV_VALUES == {"rollout_state": RolloutState, "model_policy": ModelPolicy}
