"""The registry CLI's argument checks: each case here exits before any request to the admin API."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from contracts.kv import STAGES
from deploy.local.cli import app
from services.registry.cli import StageName

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--blue-green", "2", "--shadow", "3"],
        ["--canary", "3", "--weight", "20", "--clear"],
        ["--blue-green", "2", "--canary", "3", "--weight", "20", "--shadow", "4", "--clear"],
    ],
)
def test_route_needs_exactly_one_kind(args: list[str]) -> None:
    code, output = run("route", "digits", *args, "--reason", "test")
    assert code == 2
    assert "choose exactly one of --blue-green N, --canary N --weight W, --shadow N or --clear" in output


def test_route_names_the_kinds_given_twice() -> None:
    code, output = run("route", "digits", "--blue-green", "2", "--clear", "--reason", "test")
    assert code == 2
    assert "(given: --blue-green, --clear)" in output


def test_route_canary_needs_weight() -> None:
    code, output = run("route", "digits", "--canary", "3", "--reason", "test")
    assert code == 2
    assert "--canary N needs --weight W" in output


@pytest.mark.parametrize("kind", [["--blue-green", "2"], ["--shadow", "2"], ["--clear"]])
def test_route_weight_only_with_canary(kind: list[str]) -> None:
    code, output = run("route", "digits", *kind, "--weight", "20", "--reason", "test")
    assert code == 2
    assert "--weight goes with --canary only" in output


@pytest.mark.parametrize("weight", ["0", "101"])
def test_route_weight_within_1_to_100(weight: str) -> None:
    code, _ = run("route", "digits", "--canary", "3", "--weight", weight, "--reason", "test")
    assert code == 2


def test_route_needs_a_reason() -> None:
    code, output = run("route", "digits", "--clear")
    assert code == 2
    assert "--reason" in output


def test_route_takes_a_model_not_a_version() -> None:
    code, output = run("route", "digits@3", "--clear", "--reason", "test")
    assert code == 2
    assert "write digits, not digits@3" in output


def test_promote_needs_the_version() -> None:
    code, output = run("promote", "digits", "--to", "canary", "--reason", "test")
    assert code == 2
    assert "name the version: write digits@N" in output


def test_promote_rejects_an_invalid_name() -> None:
    code, output = run("promote", "Digits@3", "--to", "canary", "--reason", "test")
    assert code == 2
    assert "invalid name 'Digits'" in output


def test_promote_rejects_an_unknown_stage() -> None:
    code, _ = run("promote", "digits@3", "--to", "production", "--reason", "test")
    assert code == 2


def test_promote_needs_a_reason() -> None:
    code, output = run("promote", "digits@3", "--to", "canary")
    assert code == 2
    assert "--reason" in output


def test_canary_verdict_needs_the_version() -> None:
    code, output = run("canary-verdict", "digits", "pass")
    assert code == 2
    assert "name the version: write digits@N" in output


def test_stage_choices_are_the_registry_stages() -> None:
    assert tuple(s.value for s in StageName) == STAGES
