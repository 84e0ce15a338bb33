"""The nats-server configuration of the embedded stack: JetStream on, one user per service.

Each service may publish only its own events (``contracts.names.SERVICE_PUBLISHES``), its own dead letters,
and what JetStream needs to consume (API requests, acks, flow-control replies), and may subscribe to its
own inbox only (``_INBOX_<service>``). Of the JetStream API a service may not create, update, delete or
purge a stream, delete a message, snapshot or restore, list consumers, nor make server or cluster requests
(``JS_API_DENIED``), nor touch another service's durable consumers (``durable_denied``): a service reads the
streams and manages its own consumers, while the streams' configuration and data are the operator's. The
``admin`` user (the CLI, operators, tests) may do everything; it provisions the streams (``conveyor up``,
``conveyor streams``).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.names import SERVICE_PUBLISHES, SERVICES, Subjects, inbox_prefix, service_durables

__all__ = [
    "ADMIN_USER",
    "JS_API_DENIED",
    "NatsConfig",
    "durable_denied",
    "render_server_config",
    "service_permissions",
]

ADMIN_USER = "admin"

# Extra publish rights beyond a service's own events: the state each one owns (DESIGN.md "Ownership").
_EXTRA_PUBLISH: dict[str, tuple[str, ...]] = {
    "registry": ("{p}.audit.>", "$KV.{kv}_rollout.>"),
    "ingest": ("$KV.{kv}_ingest_objects.>",),
    "trainer": ("$KV.{kv}_trainer.>",),
    "serving": ("$O.{kv}_predictions.>",),  # the gateway keeps recent images for feedback labels
    "monitor": ("$KV.{kv}_monitor.>",),
}

# JetStream API requests no service makes: each would destroy data, change a stream's limits (which can
# destroy it too), claim subjects for a stream of its own, or reach past the account. (Purging with a subject
# filter is how nats-py's ObjectStore.put replaces an object; the gateway writes its own format.)
JS_API_DENIED = (
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.SNAPSHOT.>",
    "$JS.API.STREAM.RESTORE.>",
    "$JS.API.STREAM.PEER.>",
    "$JS.API.STREAM.LEADER.>",
    "$JS.API.CONSUMER.LEADER.>",
    "$JS.API.CONSUMER.LIST.>",  # the list shows each push consumer's deliver subject: another's inbox
    "$JS.API.CONSUMER.NAMES.>",
    "$JS.API.ACCOUNT.>",
    "$JS.API.META.>",
    "$JS.API.SERVER.>",
)


def durable_denied(durable: str) -> list[str]:
    """Every request on the durable consumer ``durable`` of any stream: its creation, info, deletion, pause
    and reset (``CONSUMER.<verb>.<stream>.<durable>``, a filter subject after it or not), the requests with
    a two-token verb (``CONSUMER.MSG.NEXT``, ``CONSUMER.DURABLE.CREATE``), and the acks of what it delivered
    (both of JetStream's ack subject formats). A durable name is one whole token, which NATS wildcards
    match."""
    return [
        f"$JS.API.CONSUMER.*.*.{durable}",
        f"$JS.API.CONSUMER.*.*.{durable}.>",
        f"$JS.API.CONSUMER.*.*.*.{durable}",
        f"$JS.ACK.*.{durable}.>",  # $JS.ACK.<stream>.<consumer>.<delivered>.<seqs>.<time>.<pending>
        f"$JS.ACK.*.*.*.{durable}.>",  # $JS.ACK.<domain>.<account hash>.<stream>.<consumer>...
    ]


def service_permissions(
    service: str, subjects: Subjects, *, any_prefix: bool = False
) -> dict[str, dict[str, list[str]]]:
    """The publish/subscribe allow lists of one service's NATS user.

    ``any_prefix`` grants the same rights under every subject prefix (tests run each case under a fresh
    prefix on one server); an install grants them under its own prefix only.
    """
    p = "*" if any_prefix else subjects.prefix
    kv = subjects.prefix.replace("-", "_")  # KV bucket names: <kv>_<bucket>
    own = [f"{p}.{event_type}.>" for event_type in SERVICE_PUBLISHES.get(service, ())]
    extra = [s.format(p=p, kv=kv) for s in _EXTRA_PUBLISH.get(service, ())]
    if any_prefix:
        # A NATS wildcard is a whole token, and a bucket name is one token: "$KV.*_rollout.>" would match
        # nothing. Under any prefix, a service that owns a bucket (or object store) may write every one.
        extra = [s.split(".")[0] + ".*.>" if s.startswith(("$KV.", "$O.")) else s for s in extra]
        extra = list(dict.fromkeys(extra))
    return {
        "publish": {
            "allow": [
                *own,
                *extra,
                f"{p}.dlq.{service}",
                "$JS.API.>",  # stream/consumer info, consumer creation, pull requests, KV reads
                "$JS.ACK.>",  # acks, naks, in-progress
                "$JS.FC.>",  # flow-control replies of push consumers (KV watches): without, a watch stalls
            ],
            # Another service's durable consumers are its own: reading one would take its messages, an ack
            # would lose one, a delete its delivery state (contracts.names.SERVICE_CONSUMES).
            "deny": [
                *JS_API_DENIED,
                *(
                    pattern
                    for other in SERVICES
                    if other != service
                    for durable in service_durables(other)
                    for pattern in durable_denied(durable)
                ),
            ],
        },
        # Its own inbox only (``inbox_prefix``): no service reads another's replies or deliveries. Nor may
        # it subscribe to event subjects: JetStream delivers a push consumer's messages to any subject that
        # has a plain subscriber, without checking that the consumer's creator may publish there, so such a
        # subscription plus a push consumer would let a service forge another's events.
        "subscribe": {"allow": [f"{inbox_prefix(service)}.>"]},
    }


@dataclass
class NatsConfig:
    """A rendered nats-server config plus the credentials it holds."""

    store_dir: Path
    port: int
    http_port: int
    subjects: Subjects = field(default_factory=Subjects)
    host: str = "127.0.0.1"
    passwords: dict[str, str] = field(default_factory=dict)
    any_prefix: bool = False

    def __post_init__(self) -> None:
        for user in (ADMIN_USER, *SERVICES):
            self.passwords.setdefault(user, secrets.token_urlsafe(18))

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def render(self) -> str:
        users: list[tuple[str, str, dict[str, Any] | None]] = [
            (ADMIN_USER, json.dumps(self.passwords[ADMIN_USER]), None)
        ]
        users += [
            (
                service,
                json.dumps(self.passwords[service]),
                service_permissions(service, self.subjects, any_prefix=self.any_prefix),
            )
            for service in SERVICES
        ]
        return render_server_config(
            listen=f"{self.host}:{self.port}",
            http=f"{self.host}:{self.http_port}",
            store_dir=str(self.store_dir),
            users=users,
        )

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render())
        path.chmod(0o600)
        return path


def render_server_config(
    *, listen: str, http: str, store_dir: str | None, users: list[tuple[str, str, dict[str, Any] | None]]
) -> str:
    """A nats-server config with JetStream and these ``(user, password, permissions)`` users.

    ``store_dir`` None leaves JetStream's folder to the command line (``-sd``; nats-server refuses both).
    ``password`` is written as given: a JSON string literal, or an unquoted ``$VARIABLE`` that nats-server
    resolves from its environment (deploy/compose). nats-server's format accepts JSON values, so
    ``json.dumps`` quotes everything else safely.
    """
    entries = []
    for user, password, permissions in users:
        fields = [f"user: {json.dumps(user)}", f"password: {password}"]
        if permissions is not None:
            fields.append(f"permissions: {json.dumps(permissions, indent=2)}")
        entries.append("  {\n" + "\n".join("    " + f.replace("\n", "\n    ") for f in fields) + "\n  }")
    return "\n".join(
        [
            f"listen: {json.dumps(listen)}",
            f"http: {json.dumps(http)}",
            'server_name: "conveyor"',
            "max_payload: 8MB",
            f"jetstream {{ store_dir: {json.dumps(store_dir)} }}" if store_dir else "jetstream: enabled",
            "authorization {",
            "users: [",
            ",\n".join(entries),
            "]",
            "}",
            "",
        ]
    )
