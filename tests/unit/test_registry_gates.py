"""The registry's gates (issue 5, "Gates"): services/registry/gates.py, pure functions, no servers."""

from __future__ import annotations

import pytest

from contracts.events import GateResult, TrainMetrics
from contracts.kv import GatePolicy
from services.registry.gates import GateReport, SmokeResult, evaluate_gates

pytestmark = pytest.mark.unit

OK_SMOKE = SmokeResult(ok=True, detail="loaded; a batch of 2 gave logits 2x3 and embedding 2x64, all finite")
POLICY = GatePolicy(
    min_test_accuracy=0.9, max_regression={"test_accuracy": 0.01, "test_macro_f1": 0.02}, latency_budget_ms=20
)


def metrics(accuracy: float, f1: float | None = None, val: float | None = None) -> TrainMetrics:
    return TrainMetrics(
        val_accuracy=accuracy if val is None else val,
        test_accuracy=accuracy,
        test_macro_f1=accuracy if f1 is None else f1,
    )


def gates(
    challenger: TrainMetrics,
    policy: GatePolicy = POLICY,
    *,
    champion: TrainMetrics | None = None,
    on_frozen: TrainMetrics | None = None,
    smoke: SmokeResult = OK_SMOKE,
    latency: float | None = 5.0,
) -> GateReport:
    return evaluate_gates(
        challenger,
        policy,
        champion=champion,
        challenger_on_frozen=on_frozen,
        smoke=smoke,
        latency_ms_p50=latency,
    )


def by_name(report: GateReport) -> dict[str, GateResult]:
    results = {r.name: r for r in report.results}
    assert len(results) == len(report.results), "gate names are unique"
    return results


def test_a_good_first_model_passes_every_gate() -> None:
    report = gates(metrics(0.95))
    assert report.passed
    assert report.failed == []
    assert report.summary() == "all 5 gates passed"
    assert [r.name for r in report.results] == [
        "min_test_accuracy",
        "regression.test_accuracy",
        "regression.test_macro_f1",
        "smoke_load",
        "latency_p50_ms",
    ]
    results = by_name(report)
    assert results["min_test_accuracy"].value == 0.95
    assert results["min_test_accuracy"].threshold == 0.9
    assert results["latency_p50_ms"].value == 5.0
    assert results["latency_p50_ms"].threshold == 20
    assert results["smoke_load"].value is None and results["smoke_load"].detail == OK_SMOKE.detail


def test_accuracy_below_the_threshold_fails_with_value_threshold_and_detail() -> None:
    report = gates(metrics(0.85))
    assert not report.passed
    (failed,) = report.failed
    assert failed.name == "min_test_accuracy"
    assert (failed.value, failed.threshold, failed.passed) == (0.85, 0.9, False)
    assert failed.detail == "test_accuracy 0.8500 is below the policy's minimum 0.9000"
    assert report.summary() == "min_test_accuracy: test_accuracy 0.8500 is below the policy's minimum 0.9000"


def test_accuracy_exactly_at_the_threshold_passes() -> None:
    result = by_name(gates(metrics(0.9)))["min_test_accuracy"]
    assert result.passed
    assert result.detail == "test_accuracy 0.9000 >= 0.9000"


def test_no_champion_passes_each_regression_gate_with_its_detail() -> None:
    results = by_name(gates(metrics(0.95), on_frozen=metrics(0.5)))
    for name in ("regression.test_accuracy", "regression.test_macro_f1"):
        assert results[name].passed
        assert results[name].detail == "no champion yet"
        assert results[name].value is None and results[name].threshold is None


@pytest.mark.parametrize(
    ("on_frozen", "failing"),
    [
        (metrics(0.92, f1=0.91), []),  # better than the champion
        (metrics(0.89, f1=0.88), []),  # drops of exactly epsilon (0.01 and 0.02)
        (metrics(0.885, f1=0.89), ["regression.test_accuracy"]),  # accuracy drops 0.015 > 0.01
        (metrics(0.895, f1=0.87), ["regression.test_macro_f1"]),  # F1 drops 0.03 > 0.02
        (metrics(0.80, f1=0.80), ["regression.test_accuracy", "regression.test_macro_f1"]),
    ],
)
def test_regression_against_the_champion_per_metric(on_frozen: TrainMetrics, failing: list[str]) -> None:
    champion = metrics(0.90, f1=0.90)
    report = gates(metrics(0.95), champion=champion, on_frozen=on_frozen)
    assert [r.name for r in report.failed] == failing
    assert report.passed is not failing
    results = by_name(report)
    accuracy = results["regression.test_accuracy"]
    assert accuracy.value == on_frozen.test_accuracy
    assert accuracy.threshold == pytest.approx(0.89)
    assert results["regression.test_macro_f1"].threshold == pytest.approx(0.88)
    for name in failing:
        detail = results[name].detail or ""
        assert "on the champion's test split" in detail and "more than" in detail


def test_regression_detail_names_both_values_and_the_drop() -> None:
    report = gates(metrics(0.95), champion=metrics(0.90, f1=0.90), on_frozen=metrics(0.85, f1=0.95))
    result = by_name(report)["regression.test_accuracy"]
    assert result.detail == (
        "test_accuracy on the champion's test split: challenger 0.8500, champion 0.9000: "
        "a drop of 0.0500, more than the 0.0100 the policy allows"
    )


def test_the_challengers_own_split_does_not_decide_the_regression() -> None:
    # Excellent on its own (newer, easier) split, worse on the champion's frozen split: rejected.
    report = gates(metrics(0.99), champion=metrics(0.95), on_frozen=metrics(0.90))
    assert {r.name for r in report.failed} == {"regression.test_accuracy", "regression.test_macro_f1"}


def test_a_champion_without_a_frozen_evaluation_fails_the_regression_gates() -> None:
    report = gates(metrics(0.95), champion=metrics(0.90), on_frozen=None)
    assert not report.passed
    for result in report.failed:
        assert result.name.startswith("regression.")
        assert "not evaluated on the champion's test split" in (result.detail or "")


def test_only_the_monitored_metrics_are_compared() -> None:
    policy = GatePolicy(min_test_accuracy=0.5, max_regression={"test_macro_f1": 0.0})
    challenger = metrics(0.6, f1=0.9)
    report = gates(challenger, policy, champion=metrics(0.95, f1=0.9), on_frozen=challenger)
    assert report.passed
    regressions = [r.name for r in report.results if r.name.startswith("regression.")]
    assert regressions == ["regression.test_macro_f1"]


def test_an_unknown_metric_in_the_policy_fails_with_the_known_ones() -> None:
    policy = GatePolicy(max_regression={"test_acuracy": 0.01})
    report = gates(metrics(0.95), policy, champion=metrics(0.9), on_frozen=metrics(0.95))
    (failed,) = report.failed
    assert failed.name == "regression.test_acuracy"
    assert "'test_acuracy'" in (failed.detail or "") and "test_accuracy" in (failed.detail or "")


def test_a_failed_smoke_load_fails_the_report_with_its_detail() -> None:
    smoke = SmokeResult(ok=False, detail="the model did not load: model.pt cannot be loaded as TorchScript")
    report = gates(metrics(0.95), smoke=smoke, latency=None)
    assert not report.passed
    failed = by_name(report)
    assert set(failed) >= {"smoke_load", "latency_p50_ms"}
    assert [r.name for r in report.failed] == ["smoke_load", "latency_p50_ms"]
    assert failed["smoke_load"].detail == smoke.detail
    assert failed["latency_p50_ms"].value is None
    assert "not measured" in (failed["latency_p50_ms"].detail or "")


def test_latency_over_the_budget_fails() -> None:
    report = gates(metrics(0.95), latency=25.0)
    (failed,) = report.failed
    assert failed.name == "latency_p50_ms"
    assert (failed.value, failed.threshold) == (25.0, 20)
    assert failed.detail == "batch-1 p50 25.00 ms is over the 20.00 ms budget"


def test_latency_at_the_budget_passes() -> None:
    assert by_name(gates(metrics(0.95), latency=20.0))["latency_p50_ms"].passed


@pytest.mark.parametrize(
    ("accuracy", "smoke_ok", "latency", "passed"),
    [
        (0.95, True, 5.0, True),
        (0.50, True, 5.0, False),
        (0.95, False, 5.0, False),
        (0.95, True, 50.0, False),
        (0.50, False, 50.0, False),
    ],
)
def test_the_report_passes_only_when_every_gate_passes(
    accuracy: float, smoke_ok: bool, latency: float, passed: bool
) -> None:
    report = gates(metrics(accuracy), smoke=SmokeResult(smoke_ok, "detail"), latency=latency)
    assert report.passed is passed
    assert report.passed == all(r.passed for r in report.results)
    assert len(report.failed) == sum(not r.passed for r in report.results)


def test_the_results_fit_the_events_gate_report() -> None:
    report = gates(metrics(0.5), champion=metrics(0.9), on_frozen=metrics(0.5), latency=99.0)
    dumped = [r.model_dump(mode="json") for r in report.results]
    assert [GateResult.model_validate(d) for d in dumped] == report.results
    assert all(r.detail for r in report.results)
