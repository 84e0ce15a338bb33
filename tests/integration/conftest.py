"""Fixtures for messaging tests: a settings factory per simulated service on the session's nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from deploy.local.natsconf import ADMIN_USER
from services.runtime.bus import EventBus
from services.runtime.config import Settings


@pytest.fixture
def service_settings(nats_server: Any, prefix: str) -> Callable[..., Settings]:
    """``service_settings("trainer")``: settings that log in as that service's own NATS user, on this
    test's fresh prefix, with quick retries. ``user="admin"`` logs in as the admin user instead."""

    def make(service: str, *, user: str | None = None, **overrides: Any) -> Settings:
        user = user or service
        values: dict[str, Any] = {
            "service": service,
            "subject_prefix": prefix,
            "nats_url": nats_server.url,
            "nats_user": user,
            "nats_password": nats_server.passwords[user],
            "retry_base_delay_s": 0.05,
            "max_deliveries": 3,
        }
        return Settings(**(values | overrides))

    return make


@pytest.fixture
async def admin_bus(service_settings: Callable[..., Settings]) -> AsyncIterator[EventBus]:
    """A started bus logged in as the admin user (for raw publishes and reading streams)."""
    async with EventBus(service_settings("tests", user=ADMIN_USER)) as bus:
        yield bus
