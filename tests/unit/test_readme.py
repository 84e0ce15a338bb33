"""The README says what the code does: its Configuration table names every setting there is (and none
that is not), and its services table what each service consumes and publishes."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

from pydantic_settings import BaseSettings

from contracts.names import SERVICE_CONSUMES, SERVICE_PUBLISHES, SERVICES

README = Path(__file__).parents[2] / "README.md"
CONFIG_MODULES = [
    "services.runtime.config",
    "services.ingest.config",
    "services.trainer.config",
    "services.registry.config",
    "services.serving.config",
    "services.serving.gateway.config",
    "services.monitor.config",
    "deploy.local.config",
]


def settings_variables() -> set[str]:
    """The environment variable of every field of every settings class."""
    found = set()
    for name in CONFIG_MODULES:
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if inspect.isclass(cls) and issubclass(cls, BaseSettings) and cls.__module__ == name:
                prefix = cls.model_config.get("env_prefix", "")
                found |= {(prefix + field).upper() for field in cls.model_fields}
    return found


def documented_variables(known: set[str]) -> set[str]:
    """The variables of the table's first column. A row may shorten the ones after its first to their
    tail (``CONVEYOR_NATS_PORT``, ``_S3_PORT``; ``CONVEYOR_INGEST_MAX_BYTES``, ``_MAX_PIXELS``): a tail
    stands for the known variable that ends the first one's leading words with it; one that matches none
    stays unknown."""
    section = README.read_text().split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        first, *rest = re.findall(r"`([A-Z0-9_]+)`", row.split("|")[1])
        documented.add(first)
        for tail in rest:
            if tail.startswith("CONVEYOR_"):
                documented.add(first := tail)
                continue
            words = first.split("_")
            candidates = [f"{'_'.join(words[:n])}{tail}" for n in range(1, len(words))]
            documented.add(next((c for c in candidates if c in known), f"{first}…{tail}"))
    return documented


def test_every_setting_is_in_the_configuration_table() -> None:
    known = settings_variables()
    documented = documented_variables(known)
    assert len(known) > 80  # the modules above were all read
    assert sorted(known - documented) == [], "settings the README's Configuration table leaves out"
    assert sorted(documented - known) == [], "the table names variables no settings class reads"


def test_the_services_table_matches_what_each_service_consumes_and_publishes() -> None:
    section = README.read_text().split("\n### The services", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for row in section.splitlines():
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) == 4 and cells[0].split()[0] in SERVICES:
            rows[cells[0].split()[0]] = (
                set(re.findall(r"`([a-z_]+\.[a-z_]+)`", cells[1])),
                set(re.findall(r"`([a-z_]+\.[a-z_]+)`", cells[2])),
            )
    assert rows == {
        service: (set(SERVICE_CONSUMES[service]), set(SERVICE_PUBLISHES[service])) for service in SERVICES
    }
