"""What ``conveyor status`` reports: processes, health, streams, consumer lag, dead letters, endpoints."""

from __future__ import annotations

import asyncio
from typing import Any

from deploy.local.builders import BUCKETS
from deploy.local.config import StackSettings
from deploy.local.parts import HealthCheck
from deploy.local.secrets import LocalSecrets
from deploy.local.state import pid_alive, read_json, running_supervisor
from services.monitor.cli import attention
from services.runtime.bus import connect_once

__all__ = ["collect_status", "endpoints", "health_from_description", "jetstream_status"]


def health_from_description(described: str) -> HealthCheck:
    """Rebuild the ``HealthCheck`` that ``HealthCheck.describe`` wrote into ``stack.json``."""
    if described.startswith("tcp://"):
        host, _, port = described.removeprefix("tcp://").rpartition(":")
        return HealthCheck(host=host, port=int(port))
    return HealthCheck(url=described)


def endpoints(settings: StackSettings, experiment_id: str | None = None) -> dict[str, Any]:
    """Every endpoint of the stack with the local credentials (call on ``settings.with_secrets(...)``)."""
    secret = settings.s3_secret_key.get_secret_value()
    password = settings.nats_password.get_secret_value() if settings.nats_password else None
    return {
        "nats": {
            "url": settings.nats_url,
            "monitor_url": settings.nats_monitor_url,
            "user": settings.nats_user,
            "password": password,
            "subject_prefix": settings.subject_prefix,
        },
        "s3": {
            "endpoint": settings.s3_endpoint,
            "access_key": settings.s3_access_key,
            "secret_key": secret,
            "region": settings.s3_region,
            "buckets": list(BUCKETS),
        },
        "mlflow": {
            "url": settings.mlflow_url,
            "experiment_id": experiment_id,
            "otlp_traces": f"{settings.mlflow_url}/v1/traces",
        },
        "triton": {
            "url": settings.triton_url,
            "grpc": settings.triton_grpc_url,
            "metrics": settings.triton_metrics_url,
        },
        "gateway": {"url": settings.gateway_url},
        "admin_token": settings.admin_token.get_secret_value(),
        "state_dir": str(settings.state_dir),
        "logs_dir": str(settings.logs_dir),
    }


async def jetstream_status(settings: StackSettings) -> dict[str, Any]:
    """Streams with message counts, consumers with their lag, and the dead-letter count (admin user)."""
    nc = await connect_once(settings)
    try:
        jsm = nc.jsm()
        streams = []
        for info in await jsm.streams_info():
            name = info.config.name or "?"
            consumers = [
                {
                    "name": c.name,
                    "pending": c.num_pending,
                    "ack_pending": c.num_ack_pending,
                    "redelivered": c.num_redelivered,
                    "waiting": c.num_waiting,
                }
                for c in await jsm.consumers_info(name)
            ]
            streams.append(
                {
                    "name": name,
                    "subjects": list(info.config.subjects or []),
                    "messages": info.state.messages,
                    "bytes": info.state.bytes,
                    "consumers": consumers,
                }
            )
        dlq_stream = settings.subjects.dlq_stream
        dlq = next((s["messages"] for s in streams if s["name"] == dlq_stream), None)
        by_service: dict[str, int] = {}
        if dlq:
            info = await jsm.stream_info(dlq_stream, subjects_filter=">")
            by_service = {subject.rsplit(".", 1)[-1]: n for subject, n in (info.state.subjects or {}).items()}
        try:
            needing = await attention(nc.jetstream(), settings.subjects)
        except Exception:  # the buckets are made by the first service to start
            needing = []
        return {
            "ok": True,
            "streams": streams,
            "dead_letters": dlq,
            "dead_letters_by_service": by_service,
            "attention": needing,
        }
    finally:
        await nc.close()


def collect_status(settings: StackSettings) -> dict[str, Any]:
    """The full status as a JSON-ready dict; ``healthy`` is true only when every part and JetStream are."""
    settings = settings.embedded()
    secrets = LocalSecrets.load(settings.state_dir)
    if secrets is not None:
        settings = settings.with_secrets(secrets)
    state = read_json(settings.state_file) or {}
    supervisor = running_supervisor(settings.pid_file)
    parts = []
    for part in state.get("parts", []) if supervisor else []:
        alive = pid_alive(part.get("pid"), part.get("identity"))
        health = part.get("health")
        healthy = bool(alive and health and health_from_description(health).ok(timeout=2.0))
        parts.append({**part, "alive": alive, "healthy": healthy})
    jetstream: dict[str, Any] = {"ok": False, "streams": [], "dead_letters": None}
    if supervisor and secrets is not None:
        try:
            jetstream = asyncio.run(jetstream_status(settings))
        except Exception as exc:
            jetstream["error"] = f"{type(exc).__name__}: {exc}"
    running = supervisor is not None
    return {
        "running": running,
        "healthy": running and bool(parts) and all(p["healthy"] for p in parts) and jetstream["ok"],
        "stack": state.get("status") if running else "stopped",
        "error": state.get("error") if running else None,
        "supervisor_pid": supervisor,
        "up_seconds": state.get("up_seconds") if running else None,
        "parts": parts,
        "jetstream": jetstream,
        "endpoints": endpoints(settings, state.get("mlflow_experiment_id")),
    }
