"""``conveyor logs``: the parts' log files merged by time, filtered by level, rendered, and followed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from deploy.local.logs import follow, last_lines, log_files, render

pytestmark = pytest.mark.unit


def record(at: str, event: str, level: str = "info", service: str = "trainer", **fields: object) -> str:
    line = {"service": service, "event": event, "level": level, "timestamp": f"2026-12-08T05:{at}Z", **fields}
    return json.dumps(line)


def write(path: Path, *lines: str) -> None:
    with path.open("a") as handle:
        handle.writelines(line + "\n" for line in lines)


def plain(markup: str) -> str:
    console = Console(width=300, color_system=None)
    with console.capture() as captured:
        console.print(markup, highlight=False)
    return captured.get().rstrip("\n")


def test_the_last_lines_of_several_parts_merge_by_time_and_filter_by_level(tmp_path):
    write(tmp_path / "trainer.log", record("00:01.000000", "a"), record("00:03.000000", "c", "warning"))
    write(
        tmp_path / "nats.log",
        record("00:00.000000", "started", service="supervisor", part="nats"),
        "[12] 2026/12/08 05:00:02.5 [INF] Server is ready",
    )
    write(tmp_path / "registry.log", record("00:02.000000", "b", "error"), record("00:04.000000", "d"))
    (tmp_path / "trainer.log.1").write_text(record("00:00.500000", "rotated") + "\n")
    files = log_files(tmp_path)
    assert sorted(files) == ["nats", "registry", "trainer"]  # rotated files hold older lines only

    merged = last_lines(files, 10)
    # a server's line has no time of its own: it keeps its place after the JSON line before it in its file
    assert [line.text[-15:] if line.record is None else line.record["event"] for line in merged] == [
        "started",
        "Server is ready",
        "a",
        "b",
        "c",
        "d",
    ]
    assert [line.record["event"] for line in last_lines(files, 2) if line.record] == ["c", "d"]
    warned = last_lines(files, 10, "warning")  # servers' lines have no known level: left out
    assert [(line.part, line.record["event"]) for line in warned if line.record] == [
        ("registry", "b"),
        ("trainer", "c"),
    ]
    assert len(warned) == 2
    assert last_lines(files, 0) == []
    write(tmp_path / "trainer.log", *(record(f"01:{i:02}.000000", f"later {i}") for i in range(50)))
    # the last warning is 50 lines back in its file, and found
    assert [line.record["event"] for line in last_lines(files, 1, "warning") if line.record] == ["c"]


def test_a_line_renders_as_time_part_level_event_and_its_fields(tmp_path):
    write(
        tmp_path / "trainer.log",
        record(
            "16:12.534631", "labels needed [red]", "warning", model="digits", trained_on=1, trace_id="ab" * 16
        ),
        record("16:13.000000", "started", service="supervisor", part="trainer", pid=42),
        "Traceback (most recent call last):",
    )
    warning, started, text = last_lines(log_files(tmp_path), 10)
    assert plain(render(warning, 8)) == (
        "05:16:12.534 trainer  warning labels needed [red]  model=digits trained_on=1"
    )  # markup in a line is text; trace and event ids are for --json
    assert plain(render(started, 8)) == "05:16:13.000 trainer  info    (supervisor) started  pid=42"
    assert plain(render(text, 8)) == "trainer  Traceback (most recent call last):"


def test_following_sees_new_lines_and_a_rotated_file_from_its_start(tmp_path):
    log = tmp_path / "serving.log"
    write(log, record("00:00.000000", "before"))
    lines = follow({"serving": log}, poll_s=0.01)
    write(log, record("00:01.000000", "after"), record("00:02.000000", "debugging", "debug"))
    log.rename(tmp_path / "serving.log.1")  # as RotatingFileHandler rotates
    write(log, record("00:03.000000", "rotated"), "a line of its own")
    got = [next(lines) for _ in range(4)]
    assert [line.record["event"] if line.record else line.text for line in got] == [
        "after",
        "debugging",
        "rotated",
        "a line of its own",
    ]
    assert got[3].at == got[2].at  # placed after the JSON line before it
    quiet = follow({"serving": log}, level="info", poll_s=0.01)
    write(log, record("00:04.000000", "hidden", "debug"), "server text", record("00:05.000000", "shown"))
    assert next(quiet).record["event"] == "shown"
