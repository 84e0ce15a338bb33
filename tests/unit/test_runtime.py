"""Runtime pieces that need no server: settings, logs, permissions, the retry backoff."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from pydantic import ValidationError

from contracts.names import SERVICES, Subjects, durable_name, service_durables
from deploy.local.natsconf import NatsConfig, service_permissions
from services.runtime.config import Settings
from services.runtime.errors import InvalidEvent, PermanentError, TransientError, classify
from services.runtime.telemetry import MLFLOW_QUIET, current_event_id, get_logger, setup_logging

pytestmark = pytest.mark.unit


def test_production_mode_refuses_default_secrets():
    with pytest.raises(ValidationError) as err:
        Settings(mode="production")
    text = str(err.value)
    for env in (
        "CONVEYOR_S3_SECRET_KEY",
        "CONVEYOR_ADMIN_TOKEN",
        "CONVEYOR_NATS_PASSWORD",
        "CONVEYOR_S3_ACCESS_KEY",
    ):
        assert env in text
    ok = Settings(
        mode="production",
        s3_access_key="prod-key",
        s3_secret_key="a-real-secret",
        admin_token="another-real-secret",
        nats_password="nats-secret-of-16-or-more",
    )
    assert ok.mode == "production"


@pytest.mark.parametrize(
    "password", ["0-123456789abcdef0", "1234567890123456789", "short", "has space in it ok"]
)
def test_production_refuses_nats_passwords_that_nats_server_would_misread(password):
    # deploy/compose's nats-server takes the password from its environment and parses it as a value.
    with pytest.raises(ValidationError, match="CONVEYOR_NATS_PASSWORD must start with a letter"):
        Settings(
            mode="production",
            s3_access_key="prod-key",
            s3_secret_key="a-real-secret",
            admin_token="another-real-secret",
            nats_password=password,
        )
    assert Settings(nats_password=password).nats_password is not None  # local mode quotes it in its config


def test_local_mode_accepts_defaults_and_reads_the_environment(monkeypatch):
    monkeypatch.setenv("CONVEYOR_SUBJECT_PREFIX", "lab-2")
    monkeypatch.setenv("CONVEYOR_MAX_DELIVERIES", "7")
    settings = Settings()
    assert settings.subjects == Subjects("lab-2") and settings.max_deliveries == 7
    monkeypatch.setenv("CONVEYOR_SUBJECT_PREFIX", "Bad.Prefix")
    with pytest.raises(ValidationError, match="invalid subject prefix"):
        Settings()


@pytest.fixture
def logging_restored(monkeypatch):
    """setup_logging changes the process: the root logger's handlers, the excepthook, MLflow's variables."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    for name in ("MLFLOW_CONFIGURE_LOGGING", *MLFLOW_QUIET):
        monkeypatch.setenv(name, "unset")  # so that monkeypatch puts back what was there, or nothing
        monkeypatch.delenv(name)
    yield
    root.handlers, root.level = handlers, level
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_json_logs_carry_service_trace_span_and_event_id(capsys, logging_restored):
    setup_logging(Settings(service="trainer"))
    tracer = TracerProvider().get_tracer("test")
    token = current_event_id.set("evt-123")
    try:
        with tracer.start_as_current_span("work") as span:
            get_logger().info("training started", model="digits")
    finally:
        current_event_id.reset(token)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ctx = span.get_span_context()
    assert line["event"] == "training started" and line["model"] == "digits"
    assert line["service"] == "trainer" and line["event_id"] == "evt-123"
    assert line["trace_id"] == format(ctx.trace_id, "032x") and line["span_id"] == format(ctx.span_id, "016x")
    assert line["level"] == "info" and "timestamp" in line


def test_error_kinds_map_to_actions():
    assert classify(InvalidEvent("bad json")) == "invalid"
    assert classify(PermanentError("no such dataset")) == "permanent"
    assert classify(TransientError("mlflow down")) == "transient"
    assert classify(ConnectionError("reset")) == "transient"


def test_service_permissions_allow_only_own_events():
    subjects = Subjects("conveyor")
    ingest = service_permissions("ingest", subjects)["publish"]["allow"]
    assert "conveyor.dataset.versioned.>" in ingest and "conveyor.dlq.ingest" in ingest
    assert not any(s.startswith("conveyor.model.") for s in ingest)
    registry = service_permissions("registry", subjects)["publish"]["allow"]
    assert "conveyor.audit.>" in registry and "$KV.conveyor_rollout.>" in registry
    assert "$KV.conveyor_policy.>" not in registry  # policy is operator configuration
    monitor = service_permissions("monitor", subjects)["publish"]["allow"]
    assert "$KV.conveyor_monitor.>" in monitor and "$KV.conveyor_rollout.>" not in monitor
    wide = service_permissions("monitor", subjects, any_prefix=True)["publish"]["allow"]
    assert "*.drift.detected.>" in wide and "*.drift.cleared.>" in wide and "*.model.trained.>" not in wide
    assert "$KV.*.>" in service_permissions("ingest", subjects, any_prefix=True)["publish"]["allow"]
    denied = service_permissions("serving", subjects)["publish"]["deny"]
    assert "$JS.API.STREAM.DELETE.>" in denied and "$JS.API.STREAM.PURGE.>" in denied
    assert "$JS.API.STREAM.CREATE.>" in denied and "$JS.API.STREAM.UPDATE.>" in denied  # the admin's


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS's wildcards: ``*`` is one whole token, ``>`` one or more at the end."""
    tokens = subject.split(".")
    for i, token in enumerate(pattern.split(".")):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or token not in ("*", tokens[i]):
            return False
    return len(pattern.split(".")) == len(tokens)


def test_a_service_may_use_its_own_consumers_and_ephemeral_ones_but_no_other_services_durables():
    denied = service_permissions("serving", Subjects("conveyor"))["publish"]["deny"]

    def refused(subject: str) -> bool:
        return any(subject_matches(pattern, subject) for pattern in denied)

    own, other, stream = "serving-model-promoted", "registry-model-trained", "CONVEYOR_EVENTS"
    assert durable_name("registry", "model.trained") == other and other in service_durables("registry")
    for durable, expected in ((own, False), (other, True), ("a1b2c3", False)):  # a1b2c3: an ephemeral
        for subject in (
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.conveyor.model.promoted.*",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
            f"$JS.API.CONSUMER.DELETE.{stream}.{durable}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.1.7.3.1765111111000000000.0",
            f"$JS.ACK.hub.ACCHASH.{stream}.{durable}.1.7.3.1765111111000000000.0.rnd",
        ):
            assert refused(subject) is expected, subject
    assert not refused(f"$JS.API.CONSUMER.CREATE.{stream}")  # an ephemeral the server names
    assert refused(f"$JS.API.CONSUMER.LIST.{stream}")  # it would show other services' inboxes


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_consumes_through_the_durables_its_permissions_reserve(service, tmp_path, monkeypatch):
    """The deny lists come from ``SERVICE_CONSUMES``; a consumer added to a service but not declared there
    would be open to every other service."""
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("CONVEYOR_INGEST_TRIGGER", "minio")  # its raw durable too
    _, built = importlib.import_module(f"services.{service}.app").build()
    durables = sorted(consumer.durable for consumer, *_ in built.bus._consumers)
    assert durables == sorted(service_durables(service))


def test_nats_config_keeps_given_passwords_and_generates_the_rest(tmp_path):
    config = NatsConfig(tmp_path / "js", 14222, 18222, passwords={"admin": "given"})
    assert config.passwords["admin"] == "given"
    assert len(config.passwords) == 6 and all(config.passwords.values())
    text = config.render()
    assert '"127.0.0.1:14222"' in text and "jetstream" in text


def test_the_records_of_libraries_are_json_lines_too():
    # A fresh interpreter as a service starts: setup_logging first, MLflow imported after (as services do)
    script = """
import logging, warnings
from services.runtime.config import Settings
from services.runtime.telemetry import get_logger, setup_logging
setup_logging(Settings(service="registry"))
import mlflow
from mlflow.environment_variables import (
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as BAR, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT as NO_URL)
logging.getLogger("mlflow.store").info("waiting for the model version")
logging.getLogger("httpx").info("HTTP Request: POST http://triton/v2/repository/models/digits/load")
logging.getLogger("httpx").warning("connection refused")
warnings.warn("an old API", FutureWarning)
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("nats").exception("callback failed")
get_logger().info("quiet mlflow", progress_bar=BAR.get(), prints_run_url=not NO_URL.get())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=root
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # each line is JSON, or this fails
    by_event = {line["event"]: line for line in lines}
    mlflow_line = by_event["waiting for the model version"]
    assert mlflow_line["logger"] == "mlflow.store" and mlflow_line["service"] == "registry"
    assert mlflow_line["level"] == "info" and "timestamp" in mlflow_line
    assert not any("HTTP Request" in line["event"] for line in lines)  # a line per call: below WARNING
    assert by_event["connection refused"]["level"] == "warning"
    assert any("an old API" in line["event"] and line["logger"] == "py.warnings" for line in lines)
    failed = by_event["callback failed"]
    assert failed["level"] == "error" and "ZeroDivisionError" in failed["exception"]
    quiet = by_event["quiet mlflow"]
    assert quiet["progress_bar"] is False and quiet["prints_run_url"] is False

    # and a service that dies says why in its last line
    crash = script + "raise RuntimeError('the store is gone')\n"
    died = subprocess.run(
        [sys.executable, "-c", crash], capture_output=True, text=True, timeout=120, env=env, cwd=root
    )
    assert died.returncode == 1 and not died.stderr.strip(), died.stderr
    last = json.loads(died.stdout.splitlines()[-1])
    assert last["event"] == "crashed" and last["level"] == "critical" and last["service"] == "registry"
    assert "RuntimeError: the store is gone" in last["exception"]
    assert not result.stderr.strip(), result.stderr
