"""Inputs to Triton through this host's shared memory instead of gRPC bytes.

Sending a 3x224x224 image as bytes costs a protobuf copy here and a parse and copy in tritonserver's gRPC
frontend for each request; through a system shared-memory region registered with Triton, the request
carries only the region's name. Measured with ``bench/transport.py`` (Python backend, a near-free model at
3x224x224, 32 clients, the 2-core development machine, legs alternating): 1.7-2.1x the requests/s for
float32 images, 1.2-1.4x for uint8 pixels.

Each worker keeps its own regions, one per request in flight, sized by powers of two and reused once the
answer is back, up to a budget (``CONVEYOR_GATEWAY_SHARED_MEMORY_MB``; a request that does not fit goes as
bytes). It works when Triton can open the region: Triton runs on this host, or in a container whose IPC
namespace the gateway shares. When Triton refuses the first registration, the worker says why and sends
bytes from then on. When Triton forgets the regions (it restarted), the request that found out is sent again
as bytes and the regions are registered anew.

A region whose request failed or timed out may still be read by Triton: it is not reused, and is unregistered
and freed only after the request timeout has passed again.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from services.runtime.telemetry import get_logger

__all__ = ["Region", "SharedInputs"]

SMALLEST = 1 << 20
NAME_PREFIX = "conveyor-gw"
SHM_DIR = Path("/dev/shm")  # where glibc's shm_open keeps them (Triton opens the key "/<name>")


class Region:
    """A POSIX shared-memory object (``/dev/shm/<name>``) mapped here, its pages reserved up front: a full
    ``/dev/shm`` refuses the region (and the request goes as bytes) instead of killing the worker with SIGBUS
    on a write."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            self.memory = mmap.mmap(fd, size)
        except OSError:
            os.unlink(SHM_DIR / name)
            raise
        finally:
            os.close(fd)

    def write(self, batch: np.ndarray) -> None:
        np.ndarray(batch.shape, batch.dtype, buffer=self.memory)[...] = batch

    def close(self) -> None:
        self.memory.close()
        (SHM_DIR / self.name).unlink(missing_ok=True)


class SharedInputs:
    """One worker's shared-memory regions registered with Triton (``client``: a tritonclient gRPC aio
    client)."""

    def __init__(self, client: Any, budget_bytes: int, retire_after_s: float) -> None:
        """``retire_after_s``: the request timeout; also how long each call to Triton here may take."""
        self.client = client
        self.budget = budget_bytes  # 0: off (so set, too, when Triton refuses the regions)
        self.retire_after_s = retire_after_s
        self.free: dict[int, list[Region]] = {}
        self.allocated = 0  # bytes of every region this worker holds (free, in use, retiring)
        self._serial = 0
        # <prefix><pid>: another worker on this host tells a dead worker's regions by it
        self._prefix = f"{NAME_PREFIX}-{socket.gethostname()}-"
        self._owner = f"{self._prefix}{os.getpid()}"
        self._token = uuid.uuid4().hex[:8]
        self._retiring: set[asyncio.Task[None]] = set()
        self.log = get_logger(component="gateway")

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    async def start(self) -> None:
        """Free what dead workers of this host left: their ``/dev/shm`` files, and their registrations in
        Triton (which keep the memory mapped there)."""
        if not self.enabled:
            return
        _unlink_dead(self._prefix)
        try:
            status = await self.client.get_system_shared_memory_status(
                as_json=True, client_timeout=self.retire_after_s
            )
        except Exception:  # Triton not up yet: nothing registered to clean now
            return
        for region in status.get("regions", {}).values():
            name = str(region.get("name", ""))
            if name.startswith(self._prefix) and _dead(name, self._prefix):
                try:
                    await self.client.unregister_system_shared_memory(
                        name, client_timeout=self.retire_after_s
                    )
                except Exception as exc:
                    self.log.warning("stale shared-memory region stays", region=name, error=repr(exc))

    async def take(self, nbytes: int) -> Region | None:
        """A registered region of at least ``nbytes``, or None: send the bytes instead."""
        if not self.enabled:
            return None
        size = max(SMALLEST, 1 << (nbytes - 1).bit_length())
        if self.free.get(size):
            return self.free[size].pop()
        while self.allocated + size > self.budget:  # make room by freeing regions of other sizes
            victim = next((regions.pop() for regions in self.free.values() if regions), None)
            if victim is None:
                return None  # every region is in use: this request goes as bytes
            await self._release(victim)
        return await self._create(size)

    def give(self, region: Region) -> None:
        """The answer is back: the region can carry the next request."""
        self.free.setdefault(region.size, []).append(region)

    def retire(self, region: Region) -> None:
        """The request failed or timed out: Triton may still read the region, so it is freed later."""
        task = asyncio.create_task(self._retire(region))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def forget(self) -> None:
        """Triton lost the registrations (it restarted): free the free regions here, to register anew; those
        in use follow as their requests fail."""
        await self._release_free(unregister=False)

    async def stop(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await self._release_free(unregister=True)

    # ---- internals ---------------------------------------------------------------------------------------

    async def _create(self, size: int) -> Region | None:
        self._serial += 1
        name = f"{self._owner}-{self._token}-{self._serial}"
        try:
            region = Region(name, size)
        except OSError as exc:  # /dev/shm is full (or missing): the regions held are all there will be
            self.budget = self.allocated
            self.log.warning(
                "no room for another shared-memory region: the rest go as gRPC bytes (lower "
                "CONVEYOR_GATEWAY_SHARED_MEMORY_MB or the workers, or give /dev/shm more room)",
                size=size,
                held=self.allocated,
                error=repr(exc),
            )
            return None
        self.allocated += size
        try:
            await self.client.register_system_shared_memory(
                name, f"/{name}", size, client_timeout=self.retire_after_s
            )
        except Exception as exc:
            if _unreachable(exc):  # Triton is down or stuck: this request fails anyway; try next time
                self.retire(region)  # it may register the region yet: unregistered and freed later
                return None
            await self._release(region, unregister=False)
            self.budget = 0
            self.log.warning(
                "Triton cannot use this host's shared memory (it runs on another host, or in a container "
                "whose IPC namespace the gateway does not share): inputs go as gRPC bytes from now on; "
                "CONVEYOR_GATEWAY_SHARED_MEMORY_MB=0 skips this attempt",
                error=str(exc)[:300],
            )
            return None
        except BaseException:  # cancelled while registering: freed here; an entry Triton made stays until
            # a later worker, on this host, cleans up after this one (start)
            region.close()
            self.allocated -= size
            raise
        return region

    async def _release_free(self, *, unregister: bool) -> None:
        for regions in self.free.values():
            for region in regions:
                await self._release(region, unregister=unregister)
        self.free.clear()

    async def _retire(self, region: Region) -> None:
        await asyncio.sleep(self.retire_after_s)
        await self._release(region)

    async def _release(self, region: Region, *, unregister: bool = True) -> None:
        if unregister:
            try:
                await self.client.unregister_system_shared_memory(
                    region.name, client_timeout=self.retire_after_s
                )
            except Exception as exc:  # Triton gone: nothing of it holds the region any more
                self.log.debug("shared-memory region not unregistered", region=region.name, error=repr(exc))
        region.close()
        self.allocated -= region.size


def _unlink_dead(prefix: str) -> None:
    for path in SHM_DIR.glob(f"{prefix}*"):
        if _dead(path.name, prefix):
            path.unlink(missing_ok=True)


def _dead(name: str, prefix: str) -> bool:
    """Whether the worker that named a region ``<prefix><pid>-<token>-<n>`` is gone."""
    pid = name.removeprefix(prefix).split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _unreachable(exc: Exception) -> bool:
    """Triton is down, or did not answer in time (not: it refused the region)."""
    status = getattr(exc, "status", None)
    said = f"{status() if callable(status) else status} {exc}"
    return "UNAVAILABLE" in said or "DEADLINE_EXCEEDED" in said
