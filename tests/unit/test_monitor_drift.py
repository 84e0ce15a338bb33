"""The monitor's drift tests and windows (pure): each statistic against an independent computation, the
false-alarm rate on samples from one distribution, and the shifts each test is there to catch."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from scipy import stats

from contracts.events import ImageStats, InferenceSample
from contracts.kv import DriftPolicy
from services.monitor.drift import (
    Live,
    Reference,
    evaluate,
    merge_sparse_bins,
    mmd_permutation,
    psi,
    severity,
)
from services.monitor.windows import Window

pytestmark = pytest.mark.unit

LABELS = [str(i) for i in range(10)]


def profile(rng: np.random.Generator, n: int = 2000, dim: int = 16) -> dict:
    """A reference profile in the trainer's layout, from a known distribution."""
    confidence = rng.beta(8, 1, n)
    edges = np.linspace(0, 1, 11)
    counts, _ = np.histogram(confidence, bins=edges)
    return {
        "labels": LABELS,
        "class_frequencies": dict.fromkeys(LABELS, 0.1),
        "confidence": {
            "edges": edges.tolist(),
            "counts": counts.tolist(),
            "frequencies": (counts / n).tolist(),
            "mean": float(confidence.mean()),
        },
        "image_stats": {f: {"values": rng.normal(0.3, 0.05, n).tolist()} for f in ("mean", "std")},
        "embeddings": {"values": rng.normal(0, 1, (512, dim)).tolist()},
    }


def live(rng: np.random.Generator, n: int, *, shift: float = 0.0, dim: int = 16, labels=None) -> Live:
    labels = labels if labels is not None else rng.integers(0, 10, n)
    return Live(
        label_counts={str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True), strict=True)},
        confidences=rng.beta(8, 1, n),
        image_stats={"mean": rng.normal(0.3 + shift, 0.05, n), "std": rng.normal(0.3, 0.05, n)},
        embeddings=rng.normal(shift * 10, 1, (min(n, 200), dim)),
    )


def test_psi_matches_its_formula_and_is_zero_for_equal_distributions():
    expected, actual = np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.4, 0.2])
    by_hand = sum((a - e) * np.log(a / e) for a, e in zip(actual, expected, strict=True))
    assert psi(expected, actual) == pytest.approx(by_hand)
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)  # counts or shares alike
    assert psi([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]) > 1  # a class seen on one side only: large, finite
    with pytest.raises(ValueError, match="same bins"):
        psi([1, 2], [1, 2, 3])


def test_sparse_confidence_bins_are_merged_from_the_top():
    edges = np.linspace(0, 1, 11)
    counts = np.array([0, 0, 1, 2, 1, 3, 4, 6, 10, 150.0])
    assert merge_sparse_bins(edges, counts / counts.sum()).tolist() == pytest.approx([0, 0.8, 0.9, 1])
    assert merge_sparse_bins(edges, np.full(10, 0.1)).tolist() == pytest.approx(edges.tolist())


def test_mmd_statistic_equals_the_biased_estimator_and_its_p_value_is_a_permutation_share():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, (40, 3)), rng.normal(0.5, 1, (50, 3))
    bandwidth = 1.3

    def k(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * bandwidth**2))

    by_hand = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    statistic, p_value = mmd_permutation(x, y, bandwidth, permutations=99)
    assert statistic == pytest.approx(by_hand, rel=1e-5)  # float32 kernel
    assert p_value * 100 == pytest.approx(round(p_value * 100))  # (1 + count) / (1 + 99)
    assert mmd_permutation(x, y + 3, bandwidth, permutations=99)[1] == pytest.approx(0.01)


def test_same_distribution_raises_few_false_alarms_and_a_shift_is_caught():
    rng = np.random.default_rng(0)
    reference = Reference.from_profile(profile(rng))
    policy = DriftPolicy()
    false_alarms = sum(
        severity(evaluate(reference, live(rng, 500), policy, permutations=100, seed=i)) is not None
        for i in range(40)
    )
    assert false_alarms <= 4, false_alarms  # about 5 tests at ~1 % each, KS sharing its threshold
    shifted = evaluate(reference, live(rng, 500, shift=0.05), policy, permutations=100)
    drifted = {t.name for t in shifted if t.drifted}
    assert {"ks.mean", "mmd.embedding"} <= drifted and "ks.std" not in drifted
    one_class = evaluate(reference, live(rng, 500, labels=np.full(500, 3)), policy, permutations=100)
    assert next(t for t in one_class if t.name == "psi.prediction").drifted


def test_ks_agrees_with_scipy_and_shares_its_threshold_between_features():
    rng = np.random.default_rng(2)
    reference = Reference.from_profile(profile(rng))
    window = live(rng, 300, shift=0.01)
    tests = {t.name: t for t in evaluate(reference, window, DriftPolicy(ks_p_value=0.01), permutations=20)}
    expected = stats.ks_2samp(reference.image_stats["mean"], window.image_stats["mean"])
    assert tests["ks.mean"].statistic == pytest.approx(expected.statistic, abs=1e-6)
    assert tests["ks.mean"].p_value == pytest.approx(expected.pvalue, rel=1e-4)
    assert tests["ks.mean"].threshold == pytest.approx(0.005)  # 0.01 over two features


def test_severity_grows_with_the_number_and_size_of_drifted_tests():
    from contracts.events import DriftTest

    def t(name, drifted, statistic=0.3):
        return DriftTest(name=name, statistic=statistic, threshold=0.2, drifted=drifted)

    assert severity([t("ks.mean", False)]) is None
    assert severity([t("ks.mean", True)]) == "low"
    assert severity([t("ks.mean", True), t("ks.std", True)]) == "medium"
    assert severity([t("psi.prediction", True, statistic=0.5)]) == "high"


def test_a_window_keeps_bounded_memory_and_a_fair_embedding_sample():
    window = Window("m", 1, opened=0.0, embedding_sample=50)
    stats_ = ImageStats(mean=0.1, std=0.2, contrast=0.3, sharpness=0.4)
    now = datetime.now(UTC)
    for i in range(5000):
        window.add(
            InferenceSample(
                prediction_id=str(i),
                time=now,
                version=1,
                route="active",
                latency_ms=1,
                label="1",
                confidence=0.9,
                image_stats=stats_,
                embedding=[float(i)],
            )
        )
    window.add(
        InferenceSample(prediction_id="x", time=now, version=1, route="active", latency_ms=1, ok=False)
    )
    assert (window.count, window.errors, window.answered) == (5001, 1, 5000)
    assert len(window.embeddings) == 50
    assert 1500 < np.mean(window.embeddings) < 3500  # drawn from the whole window, not its start
    assert window.expired(now=10.0, seconds=5) and not window.expired(now=1.0, seconds=5)
