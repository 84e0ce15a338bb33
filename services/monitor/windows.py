"""Per model-version windows of live traffic in bounded memory (pure; no broker, no clock of its own).

A window collects the samples of one version until it holds ``window_size`` samples or ``window_seconds``
have passed since its first sample, then closes: the monitor evaluates it and a new one starts. Memory per
window is bounded: per-image statistics and confidences up to ``window_size`` values each, and a reservoir
sample of at most ``embedding_sample`` embeddings (every sample has the same chance to be in it).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from contracts.events import Feedback, InferenceSample
from services.monitor.drift import Live

__all__ = ["Window", "WindowKey"]

WindowKey = tuple[str, int]  # (model, version)
STAT_FEATURES = ("mean", "std", "contrast", "sharpness")


@dataclass
class Window:
    """The samples of one model version since the window opened."""

    model: str
    version: int
    opened: float  # monotonic seconds, for closing by time
    embedding_sample: int = 200
    seed: int = 0
    start: datetime | None = None
    end: datetime | None = None
    count: int = 0
    errors: int = 0
    label_counts: Counter[str] = field(default_factory=Counter)
    confidences: list[float] = field(default_factory=list)
    stats: dict[str, list[float]] = field(default_factory=lambda: {f: [] for f in STAT_FEATURES})
    embeddings: list[list[float]] = field(default_factory=list)
    feedback_total: int = 0
    feedback_correct: int = 0
    _seen_embeddings: int = 0
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(f"{self.model}:{self.version}:{self.seed}")

    def add(self, sample: InferenceSample) -> None:
        self.count += 1
        self.start = sample.time if self.start is None else min(self.start, sample.time)
        self.end = sample.time if self.end is None else max(self.end, sample.time)
        if not sample.ok:
            self.errors += 1
            return
        if sample.label is not None:
            self.label_counts[sample.label] += 1
        if sample.confidence is not None:
            self.confidences.append(sample.confidence)
        if sample.image_stats is not None:
            for feature in STAT_FEATURES:
                self.stats[feature].append(float(getattr(sample.image_stats, feature)))
        if sample.embedding:
            self._reservoir(sample.embedding)

    def add_feedback(self, feedback: Feedback) -> None:
        self.feedback_total += 1
        self.feedback_correct += feedback.predicted_label == feedback.true_label

    def _reservoir(self, embedding: list[float]) -> None:
        self._seen_embeddings += 1
        if len(self.embeddings) < self.embedding_sample:
            self.embeddings.append(embedding)
            return
        slot = self._rng.randrange(self._seen_embeddings)
        if slot < self.embedding_sample:
            self.embeddings[slot] = embedding

    def full(self, size: int) -> bool:
        return self.count >= size

    def expired(self, now: float, seconds: float) -> bool:
        return self.count > 0 and now - self.opened >= seconds

    @property
    def answered(self) -> int:
        """Samples with a prediction (not failed requests): what the drift tests see."""
        return self.count - self.errors

    @property
    def live_accuracy(self) -> float | None:
        return self.feedback_correct / self.feedback_total if self.feedback_total else None

    def live(self) -> Live:
        return Live(
            label_counts=dict(self.label_counts),
            confidences=np.asarray(self.confidences, dtype=np.float64),
            image_stats={f: np.asarray(v, dtype=np.float64) for f, v in self.stats.items() if v},
            embeddings=np.asarray(self.embeddings, dtype=np.float64),
        )
