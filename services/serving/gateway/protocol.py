"""uvicorn's httptools protocol with TCP_NODELAY on every connection.

With several workers uvicorn hands each one the listening socket through multiprocessing; the socket made
from that descriptor reports protocol 0, not TCP, so asyncio does not set TCP_NODELAY on the connections it
accepts, and a response written in two parts waits ~40 ms for the client's delayed ACK (Nagle). Measured
here: 44 ms for GET /healthz with 2 workers, 1 ms with 1.

httptools (llhttp, in C) rather than h11 (pure Python): measured in bench/serve.py's set-up, together with
uvloop, it took ≈1 ms of gateway CPU off each predict request on the 2-core machine.
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["NoDelayHttpToolsProtocol"]


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
