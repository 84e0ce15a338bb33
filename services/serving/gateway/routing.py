"""Which version answers a request, from the model's rollout state (pure).

- blue/green: everything goes to ``active_version``;
- canary: ``canary_weight`` percent go to ``canary_version``. With a request key (``X-Request-Key``: a user,
  a session) the choice is a hash of model and key, so one client always sees one version, and the keys
  that see the canary at 10 % still see it at 50 %; without a key it is random;
- shadow: ``shadow_version`` gets a mirror of each request (``mirror``), never answering it.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from contracts.kv import RolloutState

__all__ = ["Route", "bucket", "choose", "mirror"]

Route = Literal["active", "canary"]


def bucket(model: str, key: str) -> int:
    """0..99, stable for a model and a key."""
    digest = hashlib.blake2b(f"{model}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100


def choose(
    state: RolloutState, key: str | None, rng: random.Random | None = None
) -> tuple[int, Route] | None:
    """(version, route) for one request; None when nothing is routed (no active version nor canary)."""
    canary, weight = state.canary_version, state.canary_weight
    if canary is not None and weight > 0:
        draw = bucket(state.model, key) if key else int((rng or random).random() * 100)
        if draw < weight or state.active_version is None:
            return canary, "canary"
    if state.active_version is None:
        return None
    return state.active_version, "active"


def mirror(state: RolloutState, answered_by: int) -> int | None:
    """The shadow version to mirror a request to (not the one that answered it)."""
    shadow = state.shadow_version
    return shadow if shadow is not None and shadow != answered_by else None
