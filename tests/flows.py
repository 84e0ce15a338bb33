"""Small event flows that several tests drive through real servers."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import SpanProcessor

from contracts.envelope import Event
from contracts.events import DatasetVersioned, ModelPromoted, ModelTrained, SplitCounts
from contracts.examples import example_event
from services.ingest.datarepo import DataRepo
from services.ingest.manifest import FileEntry, Manifest, assign_split
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.consumer import Delivery


async def two_hops(settings_for: Callable[[str], Settings], processors: Sequence[SpanProcessor] = ()) -> None:
    """trainer publishes model.trained -> registry returns model.promoted -> serving handles it.

    ``settings_for(service)`` gives each simulated service its settings (its own NATS user).
    """
    done = asyncio.Event()
    template = example_event(ModelPromoted)

    async def registry_gate(event: ModelTrained, delivery: Delivery) -> ModelPromoted:
        return template.model_copy(update={"model": event.model, "version": event.version})

    async def serving(event: ModelPromoted, delivery: Delivery) -> Any:
        done.set()

    def bus(service: str) -> EventBus:
        return EventBus(settings_for(service), span_processors=processors)

    registry, serving_bus = bus("registry"), bus("serving")
    # Durables of their own: in a running stack the real registry holds the registry's durable names.
    registry.consume(ModelTrained, registry_gate, durable="two-hops-registry")
    serving_bus.consume(ModelPromoted, serving, durable="two-hops-serving")
    async with registry, serving_bus, bus("trainer") as trainer:
        await trainer.publish(example_event(ModelTrained))
        await asyncio.wait_for(done.wait(), 10)


async def assert_one_mlflow_trace(client: Any, experiment_id: str, trace_id: str | None = None) -> None:
    """The experiment holds one trace with the spans of all three services of ``two_hops``: the trainer's
    publish, the registry's process and publish, serving's process.

    In a running stack the real registry and serving also consume those events (under durables of their
    own), and their spans join the same trace whenever they arrive; the two hops' process spans are told
    apart by their consumer's durable, and the trace may hold more than these.
    """
    deadline = time.monotonic() + 30
    traces: list[Any] = []
    while time.monotonic() < deadline:
        traces = list(client.search_traces(locations=[experiment_id]))
        if traces and _two_hops_missing(traces[0].data.spans) == []:
            break
        await asyncio.sleep(0.5)
    assert len(traces) == 1, "the three services' spans should merge into one MLflow trace"
    spans = traces[0].data.spans
    assert {span.trace_id for span in spans} == {traces[0].info.trace_id}
    if trace_id:
        assert trace_id in traces[0].info.trace_id
    assert _two_hops_missing(spans) == [], [(s.name, s.attributes) for s in spans]


def _two_hops_missing(spans: list[Any]) -> list[str]:
    """What ``two_hops`` left in a trace that ``spans`` lack: exactly one process span per durable of its
    own, and the publishes of model.trained and model.promoted."""
    durables = [
        s.attributes.get("messaging.consumer.group.name") for s in spans if s.name.endswith(" process")
    ]
    missing = [d for d in ("two-hops-registry", "two-hops-serving") if durables.count(d) != 1]
    published = [s.name for s in spans if s.name.endswith(" publish")]  # "<prefix>.<type>.<name> publish"
    return missing + [
        f"{event} publish"
        for event in ("model.trained", "model.promoted")
        if not any(f".{event}." in n for n in published)
    ]


def commit_version(
    repo: DataRepo, items: list[tuple[str, str, bytes]], version: int, dataset: str = "digits"
) -> DatasetVersioned:
    """Make a dataset version the way ingest does (stage, commit, push) and return its event."""
    tmp = repo.workdir.parent / "staging"
    tmp.mkdir(exist_ok=True)
    files = {}
    for label, name, data in items:
        md5 = hashlib.md5(data).hexdigest()
        path = tmp / md5
        path.write_bytes(data)
        repo.stage_file(md5, path)
        files[f"{label}/{name}"] = FileEntry(
            f"{label}/{name}", label, md5, len(data), assign_split(md5), f"{dataset}/{label}/{name}", md5
        )
    manifest = Manifest(dataset, version, files)
    commit = repo.commit_version(manifest)
    repo.publish(dataset, version)
    return DatasetVersioned(
        dataset=dataset,
        version=version,
        git_rev=commit.git_rev,
        dvc_md5=commit.dvc_md5,
        repo_url=repo.repo_url,
        remote_url=repo.remote_url,
        label_counts=manifest.label_counts(),
        split_counts=SplitCounts(**manifest.split_counts()),
        total_bytes=manifest.total_bytes(),
        added=len(files),
        removed=0,
        rejected=0,
        source_digest=manifest.source_digest(),
        ingest_seconds=0.0,
    )


class Seen:
    """The events a test's consumers collected, and a wait for a condition on them."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def collect(self, event: Event, _: Delivery) -> None:
        """A handler for ``EventBus.consume``."""
        self.events.append(event)

    async def wait(self, predicate: Callable[[], bool], timeout: float = 120) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out; seen {self.events}")
            await asyncio.sleep(0.05)

    def of(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]
