"""``conveyor logs``: the parts' log files under ``.conveyor/logs/``, merged by time and made readable.

A service's log holds JSON lines (``services.runtime.telemetry``); a server's (nats, s3, mlflow, triton) is in
its own format, and its lines are shown as they are, in their place after the JSON line before them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from rich.markup import escape

__all__ = ["LEVELS", "Line", "follow", "last_lines", "log_files", "render"]

LEVELS = ("debug", "info", "warning", "error", "critical")
# Keys every line has or the rendering shows already (a supervisor line's ``part``), or that lead to a trace
# rather than explain the line: shown by --json only.
HIDDEN = ("timestamp", "level", "service", "event", "part", "span_id", "event_id", "trace_id")
READ_BACK_BYTES = 4 * 1024 * 1024  # of each file, for the last lines


@dataclass
class Line:
    part: str
    text: str
    record: dict[str, Any] | None  # the parsed JSON line, None for a line in a server's own format
    at: str  # the line's timestamp, or that of the JSON line before it in its file ('' before any)

    @property
    def level(self) -> str | None:
        return str(self.record.get("level", "info")).lower() if self.record else None


def log_files(logs_dir: Path) -> dict[str, Path]:
    """Each part's current log file (rotated ones, ``<part>.log.1``..., are older lines), by part name."""
    return {path.stem: path for path in sorted(logs_dir.glob("*.log"))}


def _parse(part: str, text: str, before: str) -> Line:
    record: dict[str, Any] | None = None
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        record = parsed if isinstance(parsed, dict) else None
    at = str(record.get("timestamp", before)) if record else before
    return Line(part, text, record, at)


def _lines(part: str, texts: list[str], before: str = "") -> list[Line]:
    out = []
    for text in texts:
        line = _parse(part, text, before)
        before = line.at
        out.append(line)
    return out


def _tail(path: Path, count: int | None) -> list[str]:
    """The last ``count`` lines of ``path`` (None: all of its last READ_BACK_BYTES)."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - READ_BACK_BYTES))
        texts = handle.read().decode("utf-8", errors="replace").splitlines()
    if size > READ_BACK_BYTES:
        texts = texts[1:]  # the first one is cut
    return texts if count is None else texts[-count:] if count else []


def at_least(line: Line, level: str | None) -> bool:
    """A JSON line at ``level`` or above (any line when ``level`` is None; a server's line, whose level is
    not known here, only then)."""
    if level is None:
        return True
    if line.level is None:
        return False
    rank = LEVELS.index(line.level) if line.level in LEVELS else len(LEVELS)
    return rank >= LEVELS.index(level)


def last_lines(files: dict[str, Path], count: int, level: str | None = None) -> list[Line]:
    """The last ``count`` lines at ``level`` or above across ``files``, oldest first, merged by time (a
    stable sort: a file's lines keep their order)."""
    merged: list[Line] = []
    for part, path in files.items():  # the last ``count`` overall are among each file's last ``count``
        texts = _tail(path, None if level else count)  # a level leaves out lines: look further back
        merged += [line for line in _lines(part, texts) if at_least(line, level)][-count:]
    merged.sort(key=lambda line: line.at)
    return merged[-count:] if count else []


def follow(files: dict[str, Path], level: str | None = None, poll_s: float = 0.25) -> Iterator[Line]:
    """The lines written to ``files`` from this call on, as they come (an endless iterator); a file rotated
    or made anew is read from its start."""
    handles: dict[str, tuple[BinaryIO, int]] = {}
    for part, path in files.items():
        handle = path.open("rb")
        handle.seek(0, os.SEEK_END)
        handles[part] = (handle, os.fstat(handle.fileno()).st_ino)
    return _follow(files, handles, level, poll_s)


def _follow(
    files: dict[str, Path], handles: dict[str, tuple[BinaryIO, int]], level: str | None, poll_s: float
) -> Iterator[Line]:
    partial: dict[str, bytes] = dict.fromkeys(files, b"")
    last: dict[str, str] = dict.fromkeys(files, "")
    try:
        while True:
            got = False
            for part, path in files.items():
                handle, inode = handles[part]
                chunk = handle.read()
                if chunk:
                    got = True
                    *complete, partial[part] = (partial[part] + chunk).split(b"\n")
                    texts = [c.decode("utf-8", errors="replace") for c in complete]
                    for line in _lines(part, texts, last[part]):
                        last[part] = line.at
                        if at_least(line, level):
                            yield line
                    continue
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    continue
                if now.st_ino != inode or now.st_size < handle.tell():  # rotated, or made anew
                    handle.close()
                    handles[part], partial[part] = (path.open("rb"), now.st_ino), b""
            if not got:
                time.sleep(poll_s)
    finally:
        for handle, _ in handles.values():
            handle.close()


def _value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value) if not value or " " in value else value
    return json.dumps(value, default=str)


def render(line: Line, width: int = 8) -> str:
    """``HH:MM:SS.mmm part level event key=value ...`` (Rich markup) for a JSON line, the supervisor's
    marked as such; a server's line as it is, after its part."""
    part = escape(line.part.ljust(width))
    if line.record is None:
        return f"[dim]{part}[/] {escape(line.text)}"
    record = line.record
    level = line.level or "info"
    colour = {"warning": "yellow", "error": "red", "critical": "bold red", "debug": "dim"}.get(level)
    shown = f"[{colour}]{level:<7}[/]" if colour else f"{level:<7}"
    event = str(record.get("event", ""))
    if record.get("service") == "supervisor":
        event = f"(supervisor) {event}"
    fields = " ".join(f"{k}={_value(v)}" for k, v in record.items() if k not in HIDDEN)
    text = f"{line.at[11:23]} {part} {shown} {escape(event)}"
    return text + (f"  [dim]{escape(fields)}[/]" if fields else "")
