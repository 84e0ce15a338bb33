"""The registry's promotion gates: pure functions of a challenger's measurements and the model's policy.

Domain code: no broker, no MLflow, no torch. The adapter in ``services.registry.evaluation`` measures what
these gates judge (the smoke load, the batch-1 latency and the challenger's metrics on the champion's test
split).

Gates, in report order (``GateResult.name``):

- ``min_<metric>`` -- every ``min_*`` threshold of ``GatePolicy`` (today ``min_test_accuracy``): the
  challenger's own metric (from ``model.trained``) must be at least the threshold.
- ``regression.<metric>`` -- one per metric in ``GatePolicy.max_regression``: on the champion's frozen test
  split, the challenger may fall at most epsilon below the champion. ``value`` is the challenger's metric on
  that split and ``threshold`` the lowest value allowed (champion - epsilon). Without a champion each passes
  with the detail "no champion yet"; with a champion but no evaluation of the challenger on its split each
  fails, since the comparison could not be made.
- ``smoke_load`` -- the exported model loaded and answered a batch with the right output shapes.
- ``latency_p50_ms`` -- median batch-1 inference time, at most ``GatePolicy.latency_budget_ms``.

A metric name (in a ``min_*`` field or ``max_regression``) that ``TrainMetrics`` does not have fails its gate
with a detail naming the known metrics: a misspelt policy must not wave models through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from contracts.events import GateResult, TrainMetrics
from contracts.kv import GatePolicy

__all__ = ["METRICS", "GateReport", "SmokeResult", "evaluate_gates"]

METRICS: tuple[str, ...] = ("val_accuracy", "test_accuracy", "test_macro_f1")
"""The ``TrainMetrics`` values a gate can name."""

_TOLERANCE = 1e-9  # float noise allowed at a boundary: champion 0.90 - epsilon 0.01 admits exactly 0.89


@dataclass(frozen=True)
class SmokeResult:
    """Whether the exported model loaded and answered a batch as its serving spec says, and why not."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class GateReport:
    """Every gate evaluated; ``passed`` is true when all of them passed."""

    passed: bool
    results: list[GateResult]

    @property
    def failed(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    def summary(self) -> str:
        """One line for an event's ``reason`` or a log: the failing gates and why, or that all passed."""
        if self.passed:
            return f"all {len(self.results)} gates passed"
        return "; ".join(f"{r.name}: {r.detail}" for r in self.failed)


def evaluate_gates(
    challenger: TrainMetrics,
    policy: GatePolicy,
    *,
    champion: TrainMetrics | None,
    challenger_on_frozen: TrainMetrics | None,
    smoke: SmokeResult,
    latency_ms_p50: float | None,
) -> GateReport:
    """Judge a challenger.

    ``challenger`` holds its metrics on its own test split; ``champion`` the champion's on the champion's test
    split (None: no champion yet); ``challenger_on_frozen`` the challenger's on that same split;
    ``latency_ms_p50`` is None when it could not be measured (the model did not load).
    """
    results = [
        *_thresholds(challenger, policy),
        *_regressions(policy, champion, challenger_on_frozen),
        GateResult(name="smoke_load", passed=smoke.ok, detail=smoke.detail),
        _latency(latency_ms_p50, policy.latency_budget_ms),
    ]
    return GateReport(passed=all(r.passed for r in results), results=results)


def _metric(metrics: TrainMetrics, name: str) -> float | None:
    return float(getattr(metrics, name)) if name in METRICS else None


def _unknown(gate: str, metric: str) -> GateResult:
    return GateResult(
        name=gate,
        passed=False,
        detail=f"the gate policy names metric {metric!r}, which models do not report; "
        f"known metrics: {', '.join(METRICS)}",
    )


def _thresholds(challenger: TrainMetrics, policy: GatePolicy) -> list[GateResult]:
    results = []
    for field, threshold in policy.model_dump().items():
        if (
            not field.startswith("min_")
            or isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
        ):
            continue
        metric = field.removeprefix("min_")
        value = _metric(challenger, metric)
        if value is None:
            results.append(_unknown(field, metric))
            continue
        passed = value >= threshold - _TOLERANCE
        detail = (
            f"{metric} {value:.4f} >= {threshold:.4f}"
            if passed
            else f"{metric} {value:.4f} is below the policy's minimum {threshold:.4f}"
        )
        results.append(
            GateResult(name=field, value=value, threshold=float(threshold), passed=passed, detail=detail)
        )
    return results


def _regressions(
    policy: GatePolicy, champion: TrainMetrics | None, challenger: TrainMetrics | None
) -> list[GateResult]:
    results = []
    for metric, epsilon in policy.max_regression.items():
        name = f"regression.{metric}"
        if metric not in METRICS:
            results.append(_unknown(name, metric))
        elif champion is None:
            results.append(GateResult(name=name, passed=True, detail="no champion yet"))
        elif challenger is None:
            results.append(
                GateResult(
                    name=name,
                    passed=False,
                    detail="the challenger was not evaluated on the champion's test split, so it cannot be "
                    "compared with the champion",
                )
            )
        else:
            value, best = float(getattr(challenger, metric)), float(getattr(champion, metric))
            drop = best - value
            passed = drop <= epsilon + _TOLERANCE
            where = f"{metric} on the champion's test split: challenger {value:.4f}, champion {best:.4f}"
            detail = (
                f"{where} (drop {max(drop, 0.0):.4f} <= {epsilon:.4f} allowed)"
                if passed
                else f"{where}: a drop of {drop:.4f}, more than the {epsilon:.4f} the policy allows"
            )
            threshold = round(best - epsilon, 10)
            results.append(
                GateResult(name=name, value=value, threshold=threshold, passed=passed, detail=detail)
            )
    return results


def _latency(p50: float | None, budget: float) -> GateResult:
    name = "latency_p50_ms"
    if p50 is None or not math.isfinite(p50):
        return GateResult(
            name=name,
            threshold=budget,
            passed=False,
            detail="batch-1 latency was not measured (the model did not load or answer)",
        )
    passed = p50 <= budget
    detail = (
        f"batch-1 p50 {p50:.2f} ms <= {budget:.2f} ms"
        if passed
        else f"batch-1 p50 {p50:.2f} ms is over the {budget:.2f} ms budget"
    )
    return GateResult(name=name, value=p50, threshold=budget, passed=passed, detail=detail)
