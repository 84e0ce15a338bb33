"""The registry against real MLflow, nats-server, S3 and DVC: models trained by the trainer's own pipeline
are gated, promoted, rolled out on a canary, rolled back, and every change is audited."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from contracts.audit import AuditEntry
from contracts.envelope import Event, encode
from contracts.events import (
    CanaryVerdict,
    DatasetRef,
    DatasetVersioned,
    Feedback,
    InferenceLogged,
    ModelDeployed,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
    ModelTrained,
)
from contracts.kv import GatePolicy, Hyperparameters, ModelPolicy, RolloutPolicy, RolloutState
from deploy.local.natsconf import ADMIN_USER
from services.monitor.app import build as build_monitor
from services.monitor.config import MonitorSettings
from services.monitor.state import MonitorState
from services.registry.app import build
from services.registry.audit import AuditLog
from services.registry.config import RegistrySettings
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.consumer import Delivery
from services.runtime.datasets import S3Remote
from services.trainer.pipeline import Pipeline, TrainJob
from services.trainer.tracking import MlflowTracker
from tests import traffic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOOD = Hyperparameters(epochs=6, early_stopping_patience=2, batch_size=64)
BAD = Hyperparameters(epochs=1, early_stopping_patience=0, batch_size=64, learning_rate=1e-6, seed=7)
TOKEN = "registry-test-token"


class World:
    """A model of this test's own, trained by the trainer's pipeline, and the registry's view of it."""

    def __init__(self, settings: RegistrySettings, admin: Settings, versioned: DatasetVersioned, model: str):
        self.settings, self.admin_settings, self.model = settings, admin, model
        self.versioned = versioned
        remote = S3Remote.from_settings(settings)
        self.tracker = MlflowTracker(settings.mlflow_url)
        self.pipeline = Pipeline(self.tracker, remote, settings.state_dir / "trainer-cache")
        self.promoted: list[ModelPromoted] = []
        self.rejected: list[ModelRejected] = []
        self.rolled_back: list[ModelRolledBack] = []

    async def train(self, hyperparameters: Hyperparameters = GOOD) -> ModelTrained:
        v = self.versioned
        job = TrainJob(
            model=self.model,
            dataset=DatasetRef(name=v.dataset, version=v.version, git_rev=v.git_rev, dvc_md5=v.dvc_md5),
            repo_url=v.repo_url,
            policy=ModelPolicy(model=self.model, dataset=v.dataset, hyperparameters=hyperparameters),
            cause_id=f"test-{self.model}",
        )
        return await asyncio.to_thread(self.pipeline.run, job)

    async def wait(self, predicate: Callable[[], bool], timeout: float = 90) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"timed out: promoted={[(e.version, e.to_stage) for e in self.promoted]} "
                    f"rejected={self.rejected} rolled_back={self.rolled_back}"
                )
            await asyncio.sleep(0.05)

    def stages(self) -> list[tuple[int, str]]:
        return [(e.version, e.to_stage) for e in self.promoted]

    async def rollout(self, bus: EventBus) -> RolloutState:
        kv = await bus.js.key_value(bus.subjects.kv.rollout)
        return RolloutState.model_validate_json((await kv.get(self.model)).value or b"{}")

    async def audit(self, bus: EventBus) -> list[tuple[int, AuditEntry]]:
        return await AuditLog(lambda: bus.js, bus.subjects).history(self.model)

    def aliases(self) -> dict[str, int]:
        found = self.tracker.client.get_registered_model(self.model).aliases
        return {alias: int(version) for alias, version in found.items()}

    def tags(self, version: int) -> dict[str, str]:
        return dict(self.tracker.client.get_model_version(self.model, str(version)).tags)


@pytest.fixture
async def world(
    nats_server: Any,
    s3_server: Any,
    mlflow_server: Any,
    prefix: str,
    tmp_path: Path,
    digits_v1: DatasetVersioned,
) -> AsyncIterator[tuple[World, EventBus]]:
    common = {
        "subject_prefix": prefix,
        "nats_url": nats_server.url,
        "s3_endpoint": s3_server.endpoint,
        "s3_access_key": s3_server.access_key,
        "s3_secret_key": s3_server.secret_key,
        "mlflow_url": mlflow_server.url,
        "state_dir": tmp_path / "state",
        "retry_base_delay_s": 0.1,
        "admin_token": TOKEN,
    }
    settings = RegistrySettings(
        **common, nats_user="registry", nats_password=nats_server.passwords["registry"], ack_wait_s=10
    )
    admin = Settings(
        **common, service="tests", nats_user=ADMIN_USER, nats_password=nats_server.passwords[ADMIN_USER]
    )
    w = World(settings, admin, digits_v1, f"digits-{prefix}")

    async def collect(event: Event, _: Delivery) -> None:
        {ModelPromoted: w.promoted, ModelRejected: w.rejected, ModelRolledBack: w.rolled_back}[
            type(event)
        ].append(event)  # type: ignore[attr-defined]

    bus = EventBus(admin)
    for cls in (ModelPromoted, ModelRejected, ModelRolledBack):
        bus.consume(cls, collect, durable=f"tests-{cls.type.replace('.', '-')}")
    async with bus:
        yield w, bus


async def apply_policy(bus: EventBus, policy: ModelPolicy) -> None:
    kv = await bus.js.key_value(bus.subjects.kv.policy)
    await kv.put(policy.model, policy.model_dump_json().encode())


async def champion_v1(w: World, bus: EventBus) -> ModelTrained:
    trained = await w.train()
    await bus.publish(trained)
    await w.wait(lambda: (trained.version, "champion") in w.stages())
    return trained


async def test_a_good_model_becomes_champion_and_a_replay_changes_nothing(world):
    w, bus = world
    app, service = build(w.settings)
    async with app:
        trained = await champion_v1(w, bus)
        # The same model.trained delivered again (a new message id, as after the duplicate window)
        envelope_id, body = encode(trained, source="conveyor/trainer")
        await bus.js.publish(
            bus.subjects.event(trained.type, trained.model),
            body,
            headers={"Nats-Msg-Id": f"{envelope_id}-again"},
        )
        consumed = service.bus.metrics.consumed.labels("registry", "model.trained", "ack")
        await w.wait(lambda: consumed._value.get() == 2)
        await asyncio.sleep(0.5)
    [promoted] = w.promoted
    assert (promoted.version, promoted.from_stage, promoted.to_stage) == (1, "candidate", "champion")
    assert promoted.actor == "registry" and promoted.reason.startswith("gates passed")
    assert {g.name for g in promoted.gate_report} >= {"min_test_accuracy", "smoke_load", "latency_p50_ms"}
    assert all(g.passed for g in promoted.gate_report)
    assert {n: a.sha256 for n, a in promoted.artifacts.items()} == {
        n: a.sha256 for n, a in trained.artifacts.items()
    }
    assert promoted.rollout_plan.canary_weights == [10, 50]
    assert w.aliases()["champion"] == 1
    tags = w.tags(1)
    assert tags["conveyor.gates_passed"] == "true" and json.loads(tags["conveyor.gates"])
    assert (await w.rollout(bus)).active_version == 1
    [(seq, entry)] = await w.audit(bus)
    assert seq == promoted.transition and entry.kind == "transition" and entry.to_stage == "champion"
    assert json.loads(tags[f"conveyor.audit.{seq}"])["actor"] == "registry"


async def test_a_worse_challenger_is_rejected_with_its_report(world):
    w, bus = world
    await apply_policy(bus, ModelPolicy(model=w.model, gates=GatePolicy(min_test_accuracy=0.0)))
    app, _ = build(w.settings)
    async with app:
        await champion_v1(w, bus)
        worse = await w.train(BAD)
        await bus.publish(worse)
        await w.wait(lambda: bool(w.rejected))
    [rejected] = w.rejected
    assert rejected.version == 2
    failed = {g.name: g for g in rejected.gate_report if not g.passed}
    assert set(failed) == {"regression.test_accuracy", "regression.test_macro_f1"}, rejected.gate_report
    assert failed["regression.test_accuracy"].value < failed["regression.test_accuracy"].threshold
    assert "champion" in (failed["regression.test_accuracy"].detail or "")
    assert "rejected" in w.tags(2) and w.aliases()["champion"] == 1
    entries = [e for _, e in await w.audit(bus)]
    assert [(e.kind, e.version) for e in entries] == [("transition", 1), ("rejection", 2)]
    assert entries[1].gate_report == rejected.gate_report


async def test_canary_steps_up_to_champion_and_a_failing_canary_is_rolled_back(world):
    w, bus = world
    policy = ModelPolicy(model=w.model, rollout=RolloutPolicy(canary_weights=[10, 50]))
    await apply_policy(bus, policy)
    app, _ = build(w.settings)

    async def deployed(version: int, stage: str = "staging") -> None:
        transition = next(e.transition for e in w.promoted if (e.version, e.to_stage) == (version, stage))
        await bus.publish(
            ModelDeployed(
                model=w.model,
                version=version,
                stage=stage,
                transition=transition,
                backend="python",
                loaded_versions=[1, version],
                load_seconds=0.5,
            )
        )

    async def verdict(version: int, weight: int, outcome: str) -> None:
        await bus.publish(
            CanaryVerdict(model=w.model, version=version, weight=weight, verdict=outcome, requests=250)
        )

    async def rollout_is(**expected: Any) -> RolloutState:
        async def matches() -> bool:
            state = await w.rollout(bus)
            return all(getattr(state, k) == v for k, v in expected.items())

        for _ in range(400):
            if await matches():
                return await w.rollout(bus)
            await asyncio.sleep(0.05)
        raise AssertionError(f"rollout state {await w.rollout(bus)} is not {expected}")

    async with app:
        await champion_v1(w, bus)
        await bus.publish(await w.train())
        await w.wait(lambda: (2, "staging") in w.stages())
        await rollout_is(active_version=1, canary_version=None)  # staging takes no traffic
        await deployed(2)
        await w.wait(lambda: (2, "canary") in w.stages())
        await rollout_is(active_version=1, canary_version=2, canary_weight=10)
        await verdict(2, 10, "pass")
        await rollout_is(canary_version=2, canary_weight=50)
        await verdict(2, 10, "pass")  # a stale verdict for a step already taken changes nothing
        await verdict(2, 50, "pass")
        await w.wait(lambda: (2, "champion") in w.stages())
        await rollout_is(active_version=2, canary_version=None, canary_weight=0)
        assert w.aliases().get("champion") == 2 and "retired" in w.tags(1)

        await bus.publish(await w.train())
        await w.wait(lambda: (3, "staging") in w.stages())
        await deployed(3)
        await rollout_is(canary_version=3, canary_weight=10)
        await verdict(3, 10, "fail")
        await w.wait(lambda: bool(w.rolled_back))
        await rollout_is(active_version=2, canary_version=None, canary_weight=0)
    [back] = w.rolled_back
    assert (back.stage, back.from_version, back.to_version) == ("canary", 3, 2)
    assert "canary failed at 10%" in back.reason
    assert "rejected" in w.tags(3) and "canary" not in w.aliases() and w.aliases()["champion"] == 2
    kinds = [(e.kind, e.version, e.to_stage) for _, e in await w.audit(bus)]
    assert kinds == [
        ("transition", 1, "champion"),
        ("transition", 2, "staging"),
        ("transition", 2, "canary"),
        ("rollout", 2, None),
        ("transition", 2, "champion"),
        ("transition", 3, "staging"),
        ("transition", 3, "canary"),
        ("rollback", 3, None),
    ]


async def test_manual_promote_route_and_rollback_through_the_admin_api_are_audited(world):
    w, bus = world
    await apply_policy(bus, ModelPolicy(model=w.model, rollout=RolloutPolicy(canary_weights=[20])))
    app, service = build(w.settings)
    api = app.http  # type: ignore[attr-defined]
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Conveyor-User": "alice"}
    async with app, httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://registry") as http:
        await champion_v1(w, bus)
        await bus.publish(await w.train())
        await w.wait(lambda: (2, "staging") in w.stages())

        async def post(path: str, body: dict[str, Any], status: int = 200, **kw: Any) -> dict[str, Any]:
            r = await http.post(f"/v1/models/{w.model}/{path}", json=body, headers=kw.get("h", headers))
            assert r.status_code == status, r.text
            return r.json()

        assert (await post("promote", {"version": 2, "to": "champion", "reason": "x"}, 401, h={}))[
            "detail"
        ].startswith("send the admin token")
        skipped = await post("promote", {"version": 2, "to": "champion", "reason": "hurry"}, 409)
        assert skipped["error"] == "skipped_stage" and "canary" in skipped["detail"]
        assert (await post("promote", {"version": 9, "to": "canary", "reason": "x"}, 404))["error"] == (
            "unknown_version"
        )
        assert (await post("promote", {"version": 2, "to": "prod", "reason": "x"}, 422))[
            "error"
        ] == "bad_input"
        unknown = await http.get("/v1/models/no-such-model", headers=headers)
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_model"

        to_canary = await post("promote", {"version": 2, "to": "canary", "reason": "looks good"})
        assert to_canary["changed"] and to_canary["rollout"]["canary_weight"] == 20
        again = await http.post(
            f"/v1/models/{w.model}/promote",
            json={"version": 2, "to": "canary", "reason": "looks good"},
            headers=headers,
        )
        assert again.json() == {"changed": False}
        routed = await post("route", {"kind": "clear", "reason": "pause the canary"})
        assert routed["rollout"]["canary_version"] is None
        shadow = await post("route", {"kind": "shadow", "version": 2, "reason": "mirror it"})
        assert shadow["rollout"]["shadow_version"] == 2 and shadow["events"] == []
        champion = await post("promote", {"version": 2, "to": "champion", "reason": "ship it"})
        assert champion["rollout"]["active_version"] == 2 and champion["rollout"]["shadow_version"] is None
        back = await post("rollback", {"reason": "bad reviews"})
        assert back["rollout"]["active_version"] == 1 and back["events"] == ["model.rolled_back"]
        rejected = await post("promote", {"version": 2, "to": "staging", "reason": "retry"}, 409)
        assert rejected["error"] == "rejected_version"
        await w.wait(lambda: bool(w.rolled_back))
        audit = (await http.get(f"/v1/models/{w.model}/audit", headers=headers)).json()["entries"]
        described = (await http.get(f"/v1/models/{w.model}", headers=headers)).json()
    manual = [e for e in audit if e["actor"] == "admin:alice"]
    assert [(e["kind"], e["version"], e["to_stage"]) for e in manual] == [
        ("transition", 2, "canary"),
        ("rollout", None, None),
        ("rollout", 2, None),
        ("transition", 2, "champion"),
        ("rollback", 1, "champion"),
    ]
    assert manual[-1]["replaced_version"] == 2 and manual[-1]["reason"] == "bad reviews"
    [back_event] = w.rolled_back
    assert (back_event.stage, back_event.from_version, back_event.to_version) == ("champion", 2, 1)
    assert described["aliases"] == {"champion": 1}
    assert {v["version"]: v["tags"] for v in described["versions"]} == {1: [], 2: ["rejected"]}
    assert service.registrar is not None


async def test_two_registries_racing_on_one_model_make_one_transition(world):
    w, bus = world
    first, one = build(w.settings)
    second, two = build(w.settings)
    trained = await w.train()
    async with first, second:
        results = await asyncio.gather(
            one.registrar.on_trained(trained, "cause-1"), two.registrar.on_trained(trained, "cause-1")
        )
    ids = [[e.event_id() for e in r] for r in results]
    assert ids[0] == ids[1] and len(ids[0]) == 1
    [(seq, entry)] = await w.audit(bus)
    assert entry.to_stage == "champion" and results[0][0].transition == seq  # type: ignore[attr-defined]
    assert w.aliases() == {"champion": 1}


async def test_the_cli_reads_and_changes_the_registry_over_http(world, tmp_path):
    """`conveyor models`, `audit`, `promote` and `rollback` as a user runs them, against the served API."""
    w, bus = world
    app, _ = build(w.settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app.http, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[attr-defined]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CONVEYOR_")} | {
        "CONVEYOR_STATE_DIR": str(tmp_path / "cli"),
        "CONVEYOR_REGISTRY_URL": f"http://127.0.0.1:{port}",
        "CONVEYOR_ADMIN_TOKEN": TOKEN,
        "COLUMNS": "200",
    }

    def conveyor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deploy.local.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    async with app:
        serving = asyncio.create_task(server.serve())
        try:
            await champion_v1(w, bus)
            shown = await asyncio.to_thread(conveyor, "models", w.model, "--json")
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout)["aliases"] == {"champion": 1}
            table = await asyncio.to_thread(conveyor, "models", w.model)
            assert "champion" in table.stdout and "active @1" in table.stdout, table.stdout
            audit = await asyncio.to_thread(conveyor, "audit", w.model)
            assert audit.returncode == 0 and "registry" in audit.stdout and "gates passed" in audit.stdout
            refused = await asyncio.to_thread(conveyor, "rollback", w.model, "--reason", "test")
            assert refused.returncode == 1 and "no_previous_champion" in refused.stderr, refused.stderr
            shadow = await asyncio.to_thread(
                conveyor, "promote", f"{w.model}@1", "--to", "shadow", "--reason", "mirror"
            )
            assert shadow.returncode == 1 and "champion_not_allowed" in shadow.stderr, shadow.stderr
            env["CONVEYOR_ADMIN_TOKEN"] = "wrong"
            denied = await asyncio.to_thread(conveyor, "models")
            assert denied.returncode == 1 and "unauthorized" in denied.stderr
        finally:
            server.should_exit = True
            await serving


async def test_the_monitor_judges_canaries_a_worse_one_is_rolled_back_a_better_one_promoted(
    world, nats_server, tmp_path
):
    """The registry and the monitor together: the canary verdicts come from live traffic (the samples the
    gateway would log for the held-out digits, each with its true label sent back as feedback)."""
    w, bus = world
    lenient = GatePolicy(min_test_accuracy=0, max_regression={"test_accuracy": 1, "test_macro_f1": 1})
    plan = RolloutPolicy(canary_weights=[20], min_requests=60, min_seconds=0)
    await apply_policy(bus, ModelPolicy(model=w.model, gates=lenient, rollout=plan))
    monitor_settings = MonitorSettings(
        subject_prefix=w.settings.subject_prefix,
        nats_url=w.settings.nats_url,
        mlflow_url=w.settings.mlflow_url,
        state_dir=tmp_path / "monitor",
        nats_user="monitor",
        nats_password=nats_server.passwords["monitor"],
        monitor_tick_s=0.2,
    )
    held_out = traffic.held_out("test")[:120]

    async def live(trained: ModelTrained) -> traffic.Traffic:
        folder = tmp_path / f"v{trained.version}"
        await asyncio.to_thread(w.tracker.client.download_artifacts, trained.run_id, "model", str(folder))
        return traffic.Traffic(folder / "model", trained.version)

    async def serve(canary: traffic.Traffic, champion: traffic.Traffic) -> None:
        """Every held-out image to the canary and the champion, with the true label as feedback."""
        data = [image for _, image in held_out]
        for side, route in ((canary, "canary"), (champion, "active")):
            samples = side.samples(data, route=route)
            feedback = [
                Feedback(
                    prediction_id=s.prediction_id,
                    time=s.time,
                    version=s.version,
                    predicted_label=s.label,
                    true_label=label,
                )
                for s, (label, _) in zip(samples, held_out, strict=True)
            ]
            await bus.publish(
                InferenceLogged(
                    model=w.model,
                    batch_id=f"{route}-{side.version}-{samples[0].prediction_id}",
                    sample_rate=1.0,
                    samples=samples,
                    feedback=feedback,
                )
            )

    async def canary_of(trained: ModelTrained) -> None:
        await bus.publish(trained)
        await w.wait(lambda: (trained.version, "staging") in w.stages())
        transition = next(
            e.transition for e in w.promoted if (e.version, e.to_stage) == (trained.version, "staging")
        )
        await bus.publish(
            ModelDeployed(
                model=w.model,
                version=trained.version,
                stage="staging",
                transition=transition,
                backend="python",
                loaded_versions=[1, trained.version],
                load_seconds=0.5,
            )
        )
        await w.wait(lambda: (trained.version, "canary") in w.stages())

    app, _ = build(w.settings)
    monitor_app, _ = build_monitor(monitor_settings)
    async with app, monitor_app:
        v1 = await champion_v1(w, bus)
        champion = await live(v1)
        worse = await w.train(BAD)
        await canary_of(worse)
        await serve(await live(worse), champion)
        await w.wait(lambda: bool(w.rolled_back))
        better = await w.train(GOOD.model_copy(update={"seed": 3}))
        await canary_of(better)
        await serve(await live(better), champion)
        await w.wait(lambda: (better.version, "champion") in w.stages())
    [back] = w.rolled_back
    assert (back.stage, back.from_version, back.to_version) == ("canary", worse.version, 1)
    assert "live_accuracy" in back.reason and "confidence_shift" in back.reason, back.reason
    verdicts = (await MonitorState(lambda: bus.js, bus.subjects.kv.monitor).get(w.model)).verdicts
    assert [(v.version, v.verdict) for v in verdicts] == [(worse.version, "fail"), (better.version, "pass")]
    failing = {c.name: c for c in verdicts[0].checks if not c.passed}
    assert failing["live_accuracy"].value < 0.5 < failing["live_accuracy"].threshold, failing
    assert all(c.passed for c in verdicts[1].checks), verdicts[1].checks
