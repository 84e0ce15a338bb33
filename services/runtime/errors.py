"""What a handler's failure means for its message; mapped to a JetStream action in one place (consumer.py).

Exception
 ├── contracts.InvalidEvent   bad JSON, failed validation, unknown type    -> dead letter at once
 ├── PermanentError            valid message that can never succeed         -> dead letter at once
 ├── TransientError            worth retrying (server down, lock held)      -> nak with backoff
 └── anything else             treated as transient                         -> nak with backoff
after ``max_deliveries`` failed deliveries a message goes to dead letters with the last error.
"""

from __future__ import annotations

from enum import StrEnum

from contracts.envelope import InvalidEvent

__all__ = ["InvalidEvent", "Outcome", "PermanentError", "TransientError", "classify"]


class PermanentError(Exception):
    """The message is valid but can never be handled (e.g. it names a dataset version that does not exist)."""


class TransientError(Exception):
    """A retry may succeed; ``retry_after`` overrides the backoff delay in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Outcome(StrEnum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


def classify(exc: BaseException) -> str:
    """The error kind used in metrics and dead letters."""
    if isinstance(exc, InvalidEvent):
        return "invalid"
    if isinstance(exc, PermanentError):
        return "permanent"
    return "transient"
