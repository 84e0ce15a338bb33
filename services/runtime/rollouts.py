"""Reading each model's rollout state (``contracts.kv.RolloutState``) from its NATS KV bucket.

Only the registry writes it (``services.registry.rollout.RolloutStore``); serving and the gateway read it.
"""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError

from contracts.kv import RolloutState, kv_key
from services.runtime.kvstore import LazyBucket

__all__ = ["Rollouts", "routed_versions"]


class Rollouts(LazyBucket):
    async def get(self, model: str) -> RolloutState:
        """The model's rollout state; an empty one (nothing routed) when none was written."""
        try:
            entry = await (await self.kv()).get(kv_key(model))
        except KeyNotFoundError:
            return RolloutState(model=model)
        if not entry.value:
            return RolloutState(model=model)
        return RolloutState.model_validate_json(entry.value)


def routed_versions(state: RolloutState) -> set[int]:
    """The versions some route sends traffic to (active, canary, shadow)."""
    return {v for v in (state.active_version, state.canary_version, state.shadow_version) if v is not None}
