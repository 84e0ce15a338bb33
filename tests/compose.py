"""Reading ``deploy/compose`` as Docker Compose would, for tests that hold it to the code (no Docker here).

``load("compose.yml")`` parses a file with YAML merge keys and Compose's ``!reset``/``!override`` tags;
``interpolate`` applies Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` rules to a
value with the given variables (a missing required one raises, as ``docker compose`` refuses to start);
``environment(service, variables)`` is a service's environment after interpolation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["COMPOSE_DIR", "MissingVariable", "environment", "interpolate", "load", "required_variables"]

COMPOSE_DIR = Path(__file__).resolve().parent.parent / "deploy" / "compose"

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?|-|\?)(?P<arg>[^}]*))?\}")


class MissingVariable(KeyError):
    """A ``${VAR:?message}`` whose variable is unset or empty."""


class _Loader(yaml.SafeLoader):
    pass


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_Loader.add_constructor("!reset", _tagged)
_Loader.add_constructor("!override", _tagged)


def load(name: str = "compose.yml") -> dict[str, Any]:
    """One file of ``deploy/compose``, parsed (anchors and merge keys resolved)."""
    loaded: dict[str, Any] = yaml.load((COMPOSE_DIR / name).read_text(), Loader=_Loader)
    return loaded


def interpolate(value: str, variables: dict[str, str]) -> str:
    """``value`` with Compose's variable rules applied."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        found = variables.get(name)
        if op in (":?", "?") and (found is None or (op == ":?" and found == "")):
            raise MissingVariable(f"{name}: {arg}")
        if op == ":-" and not found:
            return arg
        if op == "-" and found is None:
            return arg
        return found or ""

    return _VARIABLE.sub(replace, value)


def required_variables(text: str) -> set[str]:
    """Every ``${VAR:?...}`` in ``text``."""
    return {m.group("name") for m in _VARIABLE.finditer(text) if m.group("op") in (":?", "?")}


def environment(
    service: str, variables: dict[str, str], compose: dict[str, Any] | None = None
) -> dict[str, str]:
    """The environment ``service`` of compose.yml runs with, given the variables of ``.env``."""
    compose = compose or load()
    raw = compose["services"][service].get("environment", {})
    return {key: interpolate(str(value), variables) for key, value in raw.items()}
