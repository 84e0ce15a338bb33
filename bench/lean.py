"""What the serving benchmarks share that imports nothing heavy (their client processes import it, and
``bench/gpu.py`` builds its arguments with it on a machine with torch alone): a lean keep-alive HTTP/1.1
client, the CPU time, RSS and children of a process from /proc, and the gateway-settings argument."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
from pathlib import Path


class LeanHttp:
    """A keep-alive HTTP/1.1 client on one raw connection, one request at a time (a load generator's cost)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> bytes:
        for attempt in (1, 2):  # the server closes a connection idle for 5 s: open a new one once
            if self.streams is None:
                self.streams = await asyncio.open_connection("127.0.0.1", self.port)
            reader, writer = self.streams
            head = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            try:
                lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                self.streams = None
                if attempt == 2:
                    raise
                continue
            length = next(
                int(v) for k, _, v in (x.partition(b":") for x in lines) if k.lower() == b"content-length"
            )
            data = await reader.readexactly(length)
            if not lines[0].startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{lines[0].decode()}: {data[:200]!r}")
            return data
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def add_gateway_env(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra gateway setting, e.g. CONVEYOR_GATEWAY_INFERENCE_SAMPLE_RATE=0.1 (repeatable)",
    )
