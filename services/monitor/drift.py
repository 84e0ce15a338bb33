"""The drift tests, pure numpy/scipy: PSI on a categorical or binned distribution, two-sample KS, and MMD with
a permutation test on embeddings. Each returns plain floats; ``evaluate`` runs them all on one window.

Why these choices:

- PSI compares the predicted-class shares and the confidence histogram with the reference; empty bins are
  floored at ``PSI_EPSILON`` so that a class never seen on one side gives a large, finite value. A good
  model puts most confidences in the top bin, so the reference's sparse bins are merged with their
  neighbours until each holds ``MIN_BIN_SHARE`` of it: PSI over near-empty bins measures only sampling noise
  (measured on the digits: 0.20 between two held-out splits with ten bins, under 0.05 merged).
- KS runs once per image statistic; the p-value threshold is shared by the features (Bonferroni: each feature
  is tested at ``ks_p_value / features``), so four features raise no more false alarms than one.
- MMD uses a Gaussian kernel whose bandwidth is the median distance within the reference (fixed per
  version, so windows compare alike), on at most ``subsample`` rows per side; all permutations are one matrix
  product (``(K @ S) * S``), so 200 permutations of 400 rows cost a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from contracts.events import DriftTest
from contracts.kv import DriftPolicy

__all__ = [
    "PSI_EPSILON",
    "Live",
    "Reference",
    "evaluate",
    "gaussian_bandwidth",
    "ks",
    "merge_sparse_bins",
    "mmd_permutation",
    "psi",
    "severity",
]

PSI_EPSILON = 1e-4
MIN_BIN_SHARE = 0.05


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (counts or shares)."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1 or len(e) == 0:
        raise ValueError(f"PSI needs two 1-D distributions over the same bins, got {e.shape} and {a.shape}")
    e = np.maximum(e / max(e.sum(), 1e-12), PSI_EPSILON)
    a = np.maximum(a / max(a.sum(), 1e-12), PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def merge_sparse_bins(edges: np.ndarray, shares: np.ndarray, min_share: float = MIN_BIN_SHARE) -> np.ndarray:
    """The edges left once each bin (from the top down) is merged with its lower neighbours until it holds at
    least ``min_share`` of the reference; a remainder below that joins the lowest kept bin."""
    kept = [float(edges[-1])]
    held = 0.0
    for index in range(len(shares) - 1, 0, -1):
        held += float(shares[index])
        if held >= min_share:
            kept.append(float(edges[index]))
            held = 0.0
    if float(shares[0]) + held < min_share and len(kept) > 1:
        kept.pop()  # the bottom remainder is too small alone: it joins the bin above it
    kept.append(float(edges[0]))
    return np.array(sorted(set(kept)))


def ks(reference: np.ndarray, live: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value (scipy's exact/asymptotic choice)."""
    result = stats.ks_2samp(reference, live)
    return float(result.statistic), float(result.pvalue)


def gaussian_bandwidth(reference: np.ndarray) -> float:
    """The median pairwise Euclidean distance within ``reference`` (the usual MMD heuristic), >= 1e-6."""
    d2 = _squared_distances(reference, reference)
    upper = d2[np.triu_indices(len(reference), k=1)]
    return float(max(np.sqrt(np.median(upper)) if len(upper) else 1.0, 1e-6))


def mmd_permutation(
    reference: np.ndarray, live: np.ndarray, bandwidth: float, permutations: int, seed: int = 0
) -> tuple[float, float]:
    """Biased MMD² between the two samples under a Gaussian kernel, and its permutation p-value
    ``(1 + #{permuted >= observed}) / (1 + permutations)``."""
    # float32 halves the time of the kernel and the product; the statistics stay far above its rounding.
    x = np.concatenate([reference, live]).astype(np.float32)
    n, m = len(reference), len(live)
    kernel = np.exp(-_squared_distances(x, x) / np.float32(2 * bandwidth**2))
    first = np.concatenate([np.full(n, 1 / n), np.full(m, -1 / m)]).astype(np.float32)
    labels = np.random.default_rng(seed).permuted(np.repeat(first[:, None], permutations + 1, axis=1), axis=0)
    labels[:, 0] = first
    mmd2 = np.einsum("ij,ij->j", kernel @ labels, labels, dtype=np.float64)  # s^T K s for every column s
    observed = float(mmd2[0])
    p_value = (1 + int(np.sum(mmd2[1:] >= observed))) / (1 + permutations)
    return max(observed, 0.0), float(p_value)


def _rebin(edges: np.ndarray, counts: np.ndarray, merged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts over ``edges`` summed into the coarser ``merged`` bins (whose edges are a subset)."""
    positions = np.searchsorted(merged, edges[:-1], side="right") - 1
    return np.bincount(positions, weights=counts, minlength=len(merged) - 1), merged


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d2, 0.0)


@dataclass(frozen=True)
class Reference:
    """What a version's reference profile (the trainer's ``reference_profile.json``) holds for the tests."""

    labels: tuple[str, ...]
    class_frequencies: np.ndarray  # per label, in ``labels`` order
    confidence_edges: np.ndarray
    confidence_frequencies: np.ndarray
    image_stats: Mapping[str, np.ndarray]  # feature -> sampled values
    embeddings: np.ndarray  # sampled rows
    bandwidth: float
    mean_confidence: float

    @classmethod
    def from_profile(cls, profile: Mapping[str, object], subsample: int = 512, seed: int = 0) -> Reference:
        """Parse a profile dict; keeps at most ``subsample`` embedding rows (seeded) for the MMD test."""
        labels = tuple(str(label) for label in profile["labels"])  # type: ignore[attr-defined]
        frequencies = profile["class_frequencies"]
        confidence = profile["confidence"]
        edges = np.asarray(confidence["edges"], dtype=np.float64)  # type: ignore[index]
        counts = np.asarray(confidence["counts"], dtype=np.float64)  # type: ignore[index]
        merged = merge_sparse_bins(edges, counts / max(counts.sum(), 1))
        merged_counts, _ = _rebin(edges, counts, merged)
        embeddings = np.asarray(profile["embeddings"]["values"], dtype=np.float64)  # type: ignore[index]
        if len(embeddings) > subsample:
            rows = np.random.default_rng(seed).choice(len(embeddings), subsample, replace=False)
            embeddings = embeddings[np.sort(rows)]
        return cls(
            labels=labels,
            class_frequencies=np.array([frequencies[label] for label in labels]),  # type: ignore[index]
            confidence_edges=merged,
            confidence_frequencies=merged_counts / max(merged_counts.sum(), 1),
            image_stats={
                name: np.asarray(feature["values"], dtype=np.float64)
                for name, feature in profile.get("image_stats", {}).items()  # type: ignore[attr-defined]
            },
            embeddings=embeddings,
            bandwidth=gaussian_bandwidth(embeddings) if len(embeddings) > 1 else 1.0,
            mean_confidence=float(confidence.get("mean", 0.0)),  # type: ignore[attr-defined]
        )


@dataclass(frozen=True)
class Live:
    """One window of live traffic, as the tests need it."""

    label_counts: Mapping[str, int]
    confidences: np.ndarray
    image_stats: Mapping[str, np.ndarray]
    embeddings: np.ndarray  # a bounded subsample


def evaluate(
    reference: Reference, live: Live, policy: DriftPolicy, *, permutations: int = 200, seed: int = 0
) -> list[DriftTest]:
    """Every test the window allows, each with its statistic, p-value, threshold and verdict."""
    out = []
    # A label the reference never had (the model cannot predict it, but a profile may be older) counts
    # against the reference's known labels only.
    counts = np.array([live.label_counts.get(label, 0) for label in reference.labels], dtype=np.float64)
    if counts.sum():
        value = psi(reference.class_frequencies, counts)
        out.append(_test("psi.prediction", value, None, policy.psi_threshold, value > policy.psi_threshold))
    if len(live.confidences):
        histogram, _ = np.histogram(np.clip(live.confidences, 0, 1), bins=reference.confidence_edges)
        value = psi(reference.confidence_frequencies, histogram)
        out.append(_test("psi.confidence", value, None, policy.psi_threshold, value > policy.psi_threshold))
    features = [f for f in sorted(reference.image_stats) if len(live.image_stats.get(f, ())) > 0]
    for feature in features:
        statistic, p_value = ks(reference.image_stats[feature], live.image_stats[feature])
        limit = policy.ks_p_value / len(features)
        out.append(_test(f"ks.{feature}", statistic, p_value, limit, p_value < limit))
    if len(live.embeddings) > 1 and len(reference.embeddings) > 1:
        statistic, p_value = mmd_permutation(
            reference.embeddings, live.embeddings, reference.bandwidth, permutations, seed
        )
        out.append(
            _test("mmd.embedding", statistic, p_value, policy.mmd_p_value, p_value < policy.mmd_p_value)
        )
    return out


def severity(tests: Sequence[DriftTest]) -> str | None:
    """None (no drift), low (one test), medium (two) or high (3+ tests, or a PSI over twice its limit)."""
    drifted = [t for t in tests if t.drifted]
    if not drifted:
        return None
    big_psi = any(t.name.startswith("psi.") and t.statistic > 2 * t.threshold for t in drifted)
    if len(drifted) >= 3 or big_psi:
        return "high"
    return "medium" if len(drifted) == 2 else "low"


def _test(name: str, statistic: float, p_value: float | None, threshold: float, drifted: bool) -> DriftTest:
    return DriftTest(
        name=name,
        statistic=round(float(statistic), 6),
        p_value=None if p_value is None else float(f"{p_value:.6g}"),
        threshold=float(f"{threshold:.6g}"),
        drifted=bool(drifted),
    )
