"""``conveyor --help`` and each command's: what a newcomer reads first."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from deploy.local.cli import app

pytestmark = pytest.mark.unit


def commands(group: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every command under ``group`` (Typer's own click groups), by its words."""
    found: dict[tuple[str, ...], Any] = {}
    for name, command in group.commands.items():
        found[(*prefix, name)] = command
        if hasattr(command, "commands"):
            found |= commands(command, (*prefix, name))
    return found


def test_every_command_explains_itself_in_paragraphs_that_wrap_to_the_terminal():
    everything = commands(typer.main.get_command(app))
    assert {("up",), ("down",), ("logs",), ("route",), ("dlq", "replay"), ("policy", "apply")} <= set(
        everything
    )
    for path, command in everything.items():
        text = command.help or ""
        assert text.strip(), f"conveyor {' '.join(path)} has no help"
        assert "\n" not in text.replace("\n\n", ""), f"conveyor {' '.join(path)}: a line break mid-paragraph"
    shown = CliRunner().invoke(app, ["route", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert shown.exit_code == 0
    assert "--shadow N or --clear. Routing changes no aliases; the change is written to the audit log." in (
        shown.output
    )
