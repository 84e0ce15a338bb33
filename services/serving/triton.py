"""Triton's HTTP/REST API as serving uses it: the repository API (explicit model control), readiness, and
a smoke inference. The gateway's inference path is gRPC (``services.serving.gateway``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np

__all__ = ["TritonAdmin", "TritonError"]


class TritonError(Exception):
    """Triton refused or failed a request; the message is Triton's own."""


class TritonAdmin:
    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _client(self, timeout: float | None = None) -> httpx.AsyncClient:
        # No Accept-Encoding: Triton answers gzip with an empty binary output (DESIGN.md).
        return httpx.AsyncClient(
            base_url=self.url, timeout=timeout or self.timeout_s, headers={"Accept-Encoding": "identity"}
        )

    async def live(self) -> bool:
        try:
            async with self._client(5) as client:
                return (await client.get("/v2/health/live")).status_code == 200
        except httpx.HTTPError:
            return False

    async def load(self, model: str, timeout_s: float) -> None:
        """(Re)load ``model`` from its ``config.pbtxt``: listed versions load, the others unload. The old
        versions keep serving until the new ones are ready."""
        async with self._client(timeout_s) as client:
            response = await client.post(f"/v2/repository/models/{model}/load", json={})
        if response.status_code != 200:
            raise TritonError(_error(response))

    async def unload(self, model: str) -> None:
        async with self._client() as client:
            response = await client.post(f"/v2/repository/models/{model}/unload", json={})
        if response.status_code != 200:
            raise TritonError(_error(response))

    async def ready_versions(self, model: str) -> list[int]:
        """The versions of ``model`` Triton reports READY."""
        async with self._client() as client:
            response = await client.post("/v2/repository/index", json={})
        if response.status_code != 200:
            raise TritonError(_error(response))
        return sorted(
            int(m["version"])
            for m in response.json()
            if m.get("name") == model and m.get("state") == "READY" and str(m.get("version", "")).isdigit()
        )

    async def wait_ready(self, model: str, version: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with self._client(5) as client:
            while True:
                response = await client.get(f"/v2/models/{model}/versions/{version}/ready")
                if response.status_code == 200:
                    return
                if time.monotonic() > deadline:
                    raise TritonError(f"{model} version {version} not ready after {timeout_s:.0f} s")
                await asyncio.sleep(0.1)

    async def infer(self, model: str, version: int, name: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One inference over HTTP/JSON (for smoke tests, not the hot path)."""
        body = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "data": batch.astype(np.float32).ravel().tolist(),
                }
            ]
        }
        async with self._client() as client:
            response = await client.post(f"/v2/models/{model}/versions/{version}/infer", json=body)
        if response.status_code != 200:
            raise TritonError(_error(response))
        return {
            out["name"]: np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
            for out in response.json()["outputs"]
        }


def _error(response: httpx.Response) -> str:
    try:
        doc: Any = response.json()
        message = doc.get("error") if isinstance(doc, dict) else None
    except ValueError:
        message = None
    return f"Triton answered {response.status_code}: {message or response.text[:500]}"
