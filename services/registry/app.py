"""Builds the registry service from settings: one place that wires every dependency.

Subscribes to ``model.trained`` (gate it), ``model.deployed`` / ``model.deploy_failed`` (move a deployed
staging version on, reject one serving cannot load) and ``canary.verdict`` (step up, promote or roll back);
serves the admin API beside ``/healthz``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from faststream.asgi import AsgiFastStream
from prometheus_client import Counter

from contracts.audit import AuditEntry
from contracts.envelope import Event
from contracts.events import CanaryVerdict, ModelDeployed, ModelDeployFailed, ModelTrained
from services.registry.api import admin_api
from services.registry.audit import AuditLog
from services.registry.config import RegistrySettings
from services.registry.gatekeeper import Gatekeeper
from services.registry.registrar import Registrar
from services.registry.rollout import RolloutStore
from services.registry.stages import IllegalTransition
from services.registry.store import ModelStore
from services.runtime.bus import EventBus
from services.runtime.consumer import Delivery, kept_alive
from services.runtime.datasets import S3Remote
from services.runtime.errors import PermanentError
from services.runtime.policy import Policies
from services.runtime.service import build_app

__all__ = ["RegistryService", "build"]

E = TypeVar("E", bound=Event)


@dataclass
class RegistryService:
    settings: RegistrySettings
    bus: EventBus
    registrar: Registrar = field(init=False)
    ready: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.transitions = Counter(
            "conveyor_registry_changes",
            "Registry changes written, by kind (transition, rejection, rollback, rollout) and stage reached",
            ["model", "kind", "to_stage"],
            registry=self.bus.metrics.registry,
        )
        store = ModelStore(s.mlflow_url)
        self.registrar = Registrar(
            store,
            AuditLog(lambda: self.bus.js, s.subjects),
            RolloutStore(lambda: self.bus.js, s.subjects.kv.rollout),
            Policies(lambda: self.bus.js, s.subjects.kv.policy),
            Gatekeeper(store, S3Remote.from_settings(s), s.cache_dir),
            on_transition=self._count,
        )
        r = self.registrar
        self.bus.consume(ModelTrained, self._handler(r.on_trained), max_in_flight=s.registry_gate_concurrency)
        self.bus.consume(ModelDeployed, self._handler(r.on_deployed))
        self.bus.consume(ModelDeployFailed, self._handler(r.on_deploy_failed))
        self.bus.consume(CanaryVerdict, self._handler(r.on_verdict))

    def _handler(
        self, use_case: Callable[[E, str], Awaitable[list[Event]]]
    ) -> Callable[[E, Delivery], Awaitable[list[Event]]]:
        """The use case behind a subscriber: the causing event's id, the message kept alive while it runs
        (gating downloads and evaluates), and an illegal change turned into a dead letter with its reason."""
        keepalive = self.settings.ack_wait_s / 3

        async def handle(event: E, delivery: Delivery) -> list[Event]:
            cause = delivery.envelope.id if delivery.envelope else f"seq-{delivery.stream_seq}"
            try:
                return await kept_alive(use_case(event, cause), delivery, keepalive)
            except IllegalTransition as exc:
                raise PermanentError(str(exc)) from exc

        return handle

    def _count(self, entry: AuditEntry) -> None:
        self.transitions.labels(entry.model, entry.kind, entry.to_stage or "none").inc()

    async def start(self) -> None:
        self.ready = True

    async def stop(self) -> None:
        self.ready = False


def build(settings: RegistrySettings | None = None) -> tuple[AsgiFastStream, RegistryService]:
    s = settings or RegistrySettings()
    if s.torch_threads:
        import torch

        torch.set_num_threads(s.torch_threads)
    service = RegistryService(s, EventBus(s))

    async def ready() -> bool:
        return service.ready

    api = admin_api(service.registrar, service.bus.publish, s.admin_token.get_secret_value())
    app = build_app(service.bus, ready=ready, start=[service.start], stop=[service.stop], http=api)
    return app, service
