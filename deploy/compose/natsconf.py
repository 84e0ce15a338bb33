"""The production nats-server config (``deploy/compose/nats.conf``), rendered from the same permissions as the
embedded stack's (``deploy.local.natsconf``), with every password left to nats-server's environment.

``python -m deploy.compose.natsconf > deploy/compose/nats.conf`` writes it; ``--prefix`` for an install
whose ``CONVEYOR_SUBJECT_PREFIX`` is not ``conveyor``. A test fails when the committed file is stale.

Users: ``admin`` (operators, the CLI), one per service with exactly its rights, and ``minio``, which may
only publish MinIO's bucket notifications (JetStream publishes: the subject, and replies on ``_INBOX``).
"""

from __future__ import annotations

import argparse
from typing import Any

from contracts.names import SERVICES, Subjects
from deploy.local.natsconf import ADMIN_USER, render_server_config, service_permissions

__all__ = ["NOTIFIER_USER", "password_variable", "render_production"]

NOTIFIER_USER = "minio"


def password_variable(user: str) -> str:
    """The environment variable that holds ``user``'s password, in nats-server's container and in .env."""
    return f"NATS_{user.upper()}_PASSWORD"


def notifier_permissions(subjects: Subjects) -> dict[str, Any]:
    return {
        "publish": {"allow": [f"{subjects.prefix}.minio.events"]},
        "subscribe": {"allow": ["_INBOX.>"]},
    }


def render_production(subjects: Subjects | None = None) -> str:
    subjects = subjects or Subjects()
    users: list[tuple[str, str, dict[str, Any] | None]] = [
        (ADMIN_USER, "$" + password_variable(ADMIN_USER), None)
    ]
    users += [
        (service, "$" + password_variable(service), service_permissions(service, subjects))
        for service in SERVICES
    ]
    users.append((NOTIFIER_USER, "$" + password_variable(NOTIFIER_USER), notifier_permissions(subjects)))
    header = (
        f"# Rendered by `python -m deploy.compose.natsconf --prefix {subjects.prefix}`; do not edit it.\n"
        "# Passwords are nats-server variables, resolved from its environment (compose.yml passes them);\n"
        "# JetStream's folder is given on the command line (-sd), so a test can run this file as it is.\n"
    )
    return header + render_server_config(
        listen="0.0.0.0:4222", http="0.0.0.0:8222", store_dir=None, users=users
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prefix", default="conveyor", help="the install's CONVEYOR_SUBJECT_PREFIX")
    args = parser.parse_args(argv)
    print(render_production(Subjects(args.prefix)), end="")


if __name__ == "__main__":
    main()
