"""deploy/compose held to the code it runs: settings, users, ports, buckets, volumes and secrets.

No Docker engine runs here, so these read the files as Compose would (``tests/compose.py``) and check each
thing against the code that will read it. ``tests/integration/test_production.py`` runs the rendered
nats.conf on a real nats-server and MLflow's compose environment on a real PostgreSQL.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from contracts.names import Subjects
from deploy.compose.natsconf import NOTIFIER_USER, password_variable, render_production
from deploy.local.builders import BUCKETS
from deploy.local.config import StackSettings
from deploy.local.services import STACK_SERVICES
from services.ingest.config import IngestSettings
from services.monitor.config import MonitorSettings
from services.registry.config import RegistrySettings
from services.serving.config import ServingSettings
from services.serving.gateway.config import GatewaySettings
from services.trainer.config import TrainerSettings
from tests import compose

pytestmark = pytest.mark.unit

SETTINGS: dict[str, type[BaseSettings]] = {
    "ingest": IngestSettings,
    "trainer": TrainerSettings,
    "registry": RegistrySettings,
    "serving": ServingSettings,
    "gateway": GatewaySettings,
    "monitor": MonitorSettings,
    "cli": StackSettings,
    "streams": StackSettings,
}
ONE_SHOT = {"cli", "streams"}  # commands of the CLI: no server, no health check
ALSO_READS: dict[str, type[BaseSettings]] = {"streams": IngestSettings}  # its trigger: MinIO's stream too
# One-shot jobs, the CLI, and images with no shell or client to run a check in.
WITHOUT_HEALTHCHECK = {"minio-setup", *ONE_SHOT, "otel-collector", "jaeger", "grafana"}

COMPOSE = compose.load()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
TEXT = (compose.COMPOSE_DIR / "compose.yml").read_text()


def secrets_set() -> dict[str, str]:
    """A filled-in .env: a distinct real-looking value for every required variable."""
    values = {name: f"s3cret{name.lower().replace('_', '')}" for name in compose.required_variables(TEXT)}
    return values | {"CONVEYOR_GATEWAY_API_KEYS": '["k3y-one", "k3y-two"]', "MINIO_ROOT_USER": "conveyor"}


def env_example() -> dict[str, str]:
    lines = (compose.COMPOSE_DIR / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


def settings_of(
    service: str,
    variables: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    kind: type[BaseSettings] | None = None,
) -> BaseSettings:
    """The settings (of ``kind``, default the service's own) ``service`` reads inside its container, given
    ``variables`` as .env."""
    import os

    for key in [k for k in os.environ if k.startswith(("CONVEYOR_", "MLFLOW_", "AWS_"))]:
        monkeypatch.delenv(key)
    for key, value in compose.environment(service, variables, COMPOSE).items():
        monkeypatch.setenv(key, value)
    return (kind or SETTINGS[service])()


def port_of(url: str) -> int:
    found = re.search(r":(\d+)(/|$|')", url)
    assert found, url
    return int(found.group(1))


def test_every_stack_service_runs_as_its_own_module_and_nats_user():
    for spec in STACK_SERVICES:
        service = SERVICES[spec.name]
        assert service["command"] == ["python", "-m", spec.module or f"services.{spec.name}"]
        env = service["environment"]
        assert env["CONVEYOR_NATS_USER"] == spec.user
        assert env["CONVEYOR_NATS_PASSWORD"].startswith("${" + password_variable(spec.user) + ":?")
        assert env["CONVEYOR_MODE"] == "production"


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_each_setting_compose_gives_is_one_the_service_reads_and_accepts(service, monkeypatch):
    fields = SETTINGS[service].model_fields | (
        ALSO_READS[service].model_fields if service in ALSO_READS else {}
    )
    unknown = [
        key
        for key in SERVICES[service]["environment"]
        if key.startswith("CONVEYOR_") and key.removeprefix("CONVEYOR_").lower() not in fields
    ]
    assert unknown == [], f"{service} has no such settings: {unknown}"
    settings: Any = settings_of(service, secrets_set(), monkeypatch)  # validates, production mode included
    assert settings.mode == "production"
    assert settings.http_host == "0.0.0.0"
    assert settings.subject_prefix == SERVICES[service]["environment"]["CONVEYOR_SUBJECT_PREFIX"]
    if service in ALSO_READS:
        settings_of(service, secrets_set(), monkeypatch, ALSO_READS[service])


def test_env_example_lists_every_required_variable_and_its_placeholders_are_refused(monkeypatch):
    example = env_example()
    assert compose.required_variables(TEXT) <= set(example)
    for service in ("ingest", "gateway"):
        with pytest.raises(ValidationError, match=r"CONVEYOR_|placeholder"):
            settings_of(service, example, monkeypatch)


def test_no_secret_is_written_into_the_file():
    for name, service in SERVICES.items():
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|API_KEYS", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}: {key}={value}"


def test_a_missing_secret_stops_compose_with_its_name():
    variables = secrets_set()
    del variables["NATS_TRAINER_PASSWORD"]
    with pytest.raises(compose.MissingVariable, match="NATS_TRAINER_PASSWORD"):
        compose.environment("trainer", variables, COMPOSE)


def test_health_checks_probe_each_service_on_its_own_port_and_dependencies_wait_for_them():
    missing = {name for name, service in SERVICES.items() if "healthcheck" not in service}
    assert missing == WITHOUT_HEALTHCHECK
    for name in SETTINGS.keys() - ONE_SHOT:
        probe = " ".join(SERVICES[name]["healthcheck"]["test"])
        assert port_of(probe) == int(SERVICES[name]["environment"]["CONVEYOR_HTTP_PORT"]), name
        assert "/healthz" in probe
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        for target, rule in depends.items() if isinstance(depends, dict) else []:
            condition = rule["condition"]
            assert condition in ("service_healthy", "service_completed_successfully"), (name, target)
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{name} waits for {target}, which has no check"
        if name in SETTINGS and name not in ONE_SHOT:
            assert depends["nats"]["condition"] == "service_healthy"
            # only the admin user makes the streams: every service starts after them
            assert depends["streams"]["condition"] == "service_completed_successfully", name
    assert SERVICES["streams"]["command"] == ["conveyor", "streams"]
    assert SERVICES["streams"]["environment"]["CONVEYOR_NATS_USER"] == "admin"
    assert SERVICES["minio"]["depends_on"]["streams"]["condition"] == "service_completed_successfully"


def test_nats_conf_is_current_and_nats_gets_every_password_it_names():
    prefix = SERVICES["ingest"]["environment"]["CONVEYOR_SUBJECT_PREFIX"]
    committed = (compose.COMPOSE_DIR / "nats.conf").read_text()
    assert committed == render_production(Subjects(prefix)), (
        "deploy/compose/nats.conf is stale: python -m deploy.compose.natsconf > deploy/compose/nats.conf"
    )
    named = set(re.findall(r"password: \$([A-Z_]+)", committed))
    assert named == set(SERVICES["nats"]["environment"])
    assert "./nats.conf:/etc/nats/nats.conf:ro" in SERVICES["nats"]["volumes"]
    assert SERVICES["nats"]["command"][:2] == ["-c", "/etc/nats/nats.conf"]
    assert "-sd" in SERVICES["nats"]["command"]


def test_minio_notifies_the_subject_ingest_listens_on_as_the_notifier_user(monkeypatch):
    env = SERVICES["minio"]["environment"]
    ingest: Any = settings_of("ingest", secrets_set(), monkeypatch)
    assert ingest.ingest_trigger == "minio"
    target = next(key.removeprefix("MINIO_NOTIFY_NATS_ENABLE_") for key in env if "NOTIFY_NATS_ENABLE" in key)
    assert env[f"MINIO_NOTIFY_NATS_SUBJECT_{target}"] == ingest.ingest_notify_subject
    assert env[f"MINIO_NOTIFY_NATS_USERNAME_{target}"] == NOTIFIER_USER
    assert env[f"MINIO_NOTIFY_NATS_PASSWORD_{target}"].startswith("${" + password_variable(NOTIFIER_USER))
    assert env[f"MINIO_NOTIFY_NATS_JETSTREAM_{target}"] == "on"
    setup = SERVICES["minio-setup"]["command"][0]
    assert f"arn:minio:sqs::{target}:nats" in setup
    assert f"conveyor/{ingest.incoming_bucket} " in setup
    made = re.search(r"for bucket in ([a-z0-9 -]+); do mc mb", setup)
    assert made and tuple(made.group(1).split()) == BUCKETS


def _mounts(service: str) -> dict[str, str]:
    """Mount path -> volume name (named volumes only)."""
    found = {}
    for volume in SERVICES[service].get("volumes", []):
        source, path = volume.split(":")[:2]
        if not source.startswith((".", "/", "$")):
            found[path] = source
    return found


def test_services_share_the_volumes_their_paths_name(monkeypatch):
    variables = secrets_set()
    serving: Any = settings_of("serving", variables, monkeypatch)
    gateway: Any = settings_of("gateway", variables, monkeypatch)
    models = _mounts("serving")[str(serving.model_repository)]
    assert _mounts("gateway")[str(gateway.model_repository)] == models
    triton_repository = next(a.split("=", 1)[1] for a in SERVICES["triton"]["command"] if "repository" in a)
    assert _mounts("triton")[triton_repository] == models
    assert ":ro" in next(v for v in SERVICES["triton"]["volumes"] if v.startswith(models))

    ingest: Any = settings_of("ingest", variables, monkeypatch)
    # dataset.versioned carries this URL: the trainer and the registry clone from the same path.
    remote = ingest.ingest_git_remote.removeprefix("file://")
    data = _mounts("ingest")[remote]
    for reader in ("trainer", "registry", "cli"):
        assert _mounts(reader)[remote] == data
    state = {_mounts(name)["/var/lib/conveyor"] for name in SETTINGS.keys() - ONE_SHOT}
    assert len(state) == len(SETTINGS) - len(ONE_SHOT), "each service keeps its state in a volume of its own"
    assert set(COMPOSE["volumes"]) >= state | {models, data}


def test_the_gateway_shares_tritons_ipc_namespace_for_its_input_regions(monkeypatch):
    gateway: Any = settings_of("gateway", secrets_set(), monkeypatch)
    assert gateway.gateway_shared_memory_mb > 0
    assert SERVICES["triton"]["ipc"] == "shareable" and SERVICES["gateway"]["ipc"] == "service:triton"
    shm = int(SERVICES["triton"]["shm_size"].removesuffix("gb")) * 1024
    workers = int(gateway.gateway_workers)
    assert workers * gateway.gateway_shared_memory_mb <= shm / 2, "the Python backend's stubs need room too"


def test_prometheus_scrapes_every_conveyor_process():
    import yaml

    config = yaml.safe_load((compose.COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    for name in SETTINGS.keys() - ONE_SHOT:
        assert f"{name}:{SERVICES[name]['environment']['CONVEYOR_HTTP_PORT']}" in targets


def test_images_are_pinned_and_overridable():
    for name, service in SERVICES.items():
        image = compose.interpolate(service["image"], {})
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (name, image)
        assert service["image"].startswith("${"), f"{name}: an image a mirror can replace"


def test_the_cpu_override_changes_only_what_exists():
    override = compose.load("compose.cpu.yml")
    for name, service in override["services"].items():
        assert name in SERVICES
        for key in service.get("environment", {}):
            assert key.removeprefix("CONVEYOR_").lower() in SETTINGS[name].model_fields, (name, key)
    assert "!reset" in (compose.COMPOSE_DIR / "compose.cpu.yml").read_text()


def test_a_generated_env_file_is_accepted_by_every_service(monkeypatch, tmp_path):
    from deploy.compose import envfile
    from services.runtime.config import NATS_SAFE_PASSWORD

    text = envfile.render()
    pairs = [line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")]
    variables = dict(pairs)
    assert envfile.PLACEHOLDER not in "".join(variables.values())
    assert compose.required_variables(TEXT) <= set(variables)
    assert all(NATS_SAFE_PASSWORD.fullmatch(v) for k, v in variables.items() if k.startswith("NATS_"))
    passwords = [v for k, v in variables.items() if "PASSWORD" in k]
    assert len(set(passwords)) == len(passwords), "each secret its own"
    for service in SETTINGS:
        settings: Any = settings_of(service, variables, monkeypatch)
        assert settings.mode == "production"
    target = tmp_path / ".env"
    envfile.main(["--output", str(target)])
    assert target.stat().st_mode & 0o777 == 0o600
    first = target.read_text()
    with pytest.raises(SystemExit, match="exists already"):
        envfile.main(["--output", str(target)])
    assert target.read_text() == first


def test_every_service_of_the_conveyor_image_builds_it():
    image = SERVICES["ingest"]["image"]
    users = [name for name, service in SERVICES.items() if service["image"] == image]
    assert {*SETTINGS, "mlflow"} <= set(users)
    build = {"context": "../..", "dockerfile": "deploy/compose/Dockerfile"}
    for name in users:  # else compose may try to pull it for the first of them to start
        assert SERVICES[name]["build"] == build, name
    assert (compose.COMPOSE_DIR / SERVICES["ingest"]["build"]["context"] / "pyproject.toml").is_file()


def test_the_image_never_takes_the_install_secrets_or_local_state():
    ignored = (compose.COMPOSE_DIR.parent.parent / ".dockerignore").read_text().split()
    for path in ("deploy/compose/.env", "deploy/compose/uploads", ".venv", ".conveyor", ".git"):
        assert path in ignored, f"{path} would be sent to the image build"
    copied = re.findall(r"^COPY (.+) \S+$", (compose.COMPOSE_DIR / "Dockerfile").read_text(), re.M)
    assert copied == ["pyproject.toml README.md", "contracts", "services", "deploy"]
