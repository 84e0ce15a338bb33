"""Golden example envelopes, one JSON file per event type (``<type>.json``), validated by the contract tests.

Tests, benchmarks and docs take realistic events from here instead of inventing their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from contracts.envelope import CloudEvent, Event, decode

__all__ = ["EXAMPLES_DIR", "example_envelope", "example_event"]

EXAMPLES_DIR = Path(__file__).parent
E = TypeVar("E", bound=Event)


def example_envelope(event_type: str) -> CloudEvent:
    return CloudEvent.model_validate_json((EXAMPLES_DIR / f"{event_type}.json").read_bytes())


def example_event(event_cls: type[E]) -> E:
    """The golden example of ``event_cls``, decoded and validated."""
    return decode((EXAMPLES_DIR / f"{event_cls.type}.json").read_bytes(), event_cls)[1]
