"""Builds the serving service (the repository manager) from settings: one place that wires everything.

Consumes ``model.promoted`` and ``model.rolled_back``; publishes ``model.deployed`` / ``model.deploy_failed``.
Ready when Triton is live. The gateway is a process of its own (``python -m services.serving.gateway``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from faststream.asgi import AsgiFastStream

from contracts.envelope import Event
from contracts.events import ModelPromoted, ModelRolledBack
from contracts.kv import RolloutState
from services.runtime.bus import EventBus
from services.runtime.consumer import Delivery, kept_alive
from services.runtime.rollouts import Rollouts, routed_versions
from services.runtime.service import build_app
from services.runtime.tasks import cancel
from services.runtime.telemetry import get_logger
from services.serving.config import ServingSettings
from services.serving.deployer import Deployer
from services.serving.repository import ModelRepository
from services.serving.triton import TritonAdmin

__all__ = ["ServingService", "build"]


@dataclass
class ServingService:
    settings: ServingSettings
    bus: EventBus
    deployer: Deployer = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.triton = TritonAdmin(s.triton_url)
        self.rollouts = Rollouts(lambda: self.bus.js, s.subjects.kv.rollout)
        self._reconciling: asyncio.Task[None] | None = None
        self.log = get_logger(service=s.service)
        self.deployer = Deployer(
            ModelRepository(s.model_repository, s.triton_options()),
            self.triton,
            self.rollouts,
            s.mlflow_url,
            s.work_dir,
            load_timeout_s=s.serving_load_timeout_s,
            keep_versions=s.serving_keep_versions,
        )
        # One change at a time per replica: Triton loads one config per model at once anyway.
        self.bus.consume(ModelPromoted, self.on_promoted, max_in_flight=4)
        self.bus.consume(ModelRolledBack, self.on_rolled_back, max_in_flight=4)

    async def start(self) -> None:
        self._reconciling = asyncio.create_task(self.reconcile_forever())

    async def stop(self) -> None:
        await cancel(self._reconciling)

    async def reconcile_forever(self) -> None:
        """Every few seconds: the routed versions of every model are loaded (a hand-set route included)."""
        while True:
            await asyncio.sleep(self.settings.serving_reconcile_interval_s)
            try:
                for model, raw in (await self.rollouts.current()).items():
                    state = RolloutState.model_validate_json(raw)
                    await self.deployer.reconcile(model, routed_versions(state))
            except Exception as exc:  # NATS or Triton away for a moment: next round
                self.log.warning("reconcile failed", error=repr(exc))

    async def on_promoted(self, event: ModelPromoted, delivery: Delivery) -> Event | None:
        return await kept_alive(self.deployer.on_promoted(event), delivery, self.settings.ack_wait_s / 3)

    async def on_rolled_back(self, event: ModelRolledBack, delivery: Delivery) -> Event | None:
        return await kept_alive(self.deployer.on_rolled_back(event), delivery, self.settings.ack_wait_s / 3)


def build(settings: ServingSettings | None = None) -> tuple[AsgiFastStream, ServingService]:
    s = settings or ServingSettings()
    service = ServingService(s, EventBus(s))
    app = build_app(service.bus, ready=service.triton.live, start=[service.start], stop=[service.stop])
    return app, service
