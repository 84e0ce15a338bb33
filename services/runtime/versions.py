"""The dataset versions ingest announced, read back from the control stream (no ingest state is touched).

Used by the CLI (`conveyor datasets`) and the trainer (which version is the newest, for drift retraining
and `conveyor train DATASET`).
"""

from __future__ import annotations

from nats.js.api import ConsumerConfig, DeliverPolicy

from contracts.envelope import decode
from contracts.events import DatasetVersioned
from services.runtime.bus import connect_once
from services.runtime.config import Settings
from services.runtime.pull import read_through

__all__ = ["read_versions"]


async def read_versions(settings: Settings, dataset: str = "*") -> list[DatasetVersioned]:
    """Every announced version (of one dataset or all), oldest first, from the control stream;
    ``NatsUnreachable`` when NATS does not answer."""
    nc = await connect_once(settings)
    try:
        subject = settings.subjects.event_filter(DatasetVersioned.type, dataset)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        versions = [
            decode(msg.data, DatasetVersioned)[1]
            async for msg in read_through(nc.jetstream(), settings.subjects.control_stream, subject, config)
        ]
        latest = {(v.dataset, v.version): v for v in versions}  # a re-sent announcement is the same version
        return sorted(latest.values(), key=lambda v: (v.dataset, v.version))
    finally:
        await nc.close()
