"""Local credentials of the embedded stack, generated once into ``<state>/secrets.json`` (mode 0600).

They are reused on every ``conveyor up``, so the data written with them (NATS streams, S3 objects, MLflow
runs) stays reachable across ``down``/``up``. Delete the state dir to start over with new ones.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contracts.names import SERVICES
from deploy.local.natsconf import ADMIN_USER

__all__ = ["SECRETS_FILE", "LocalSecrets"]

SECRETS_FILE = "secrets.json"


def _password() -> str:
    return secrets.token_urlsafe(18)


@dataclass
class LocalSecrets:
    """NATS passwords per user (``admin`` and one per service), S3 keys and the admin API token."""

    nats: dict[str, str] = field(default_factory=dict)
    s3_access_key: str = field(default_factory=lambda: "conveyor-" + secrets.token_hex(6))
    s3_secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    def __post_init__(self) -> None:
        for user in (ADMIN_USER, *SERVICES):
            self.nats.setdefault(user, _password())

    @classmethod
    def path(cls, state_dir: Path) -> Path:
        return state_dir / SECRETS_FILE

    @classmethod
    def load(cls, state_dir: Path) -> LocalSecrets | None:
        """The stored credentials, or None when the stack never ran in this state dir."""
        path = cls.path(state_dir)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise RuntimeError(
                f"{path} is not a valid secrets file ({exc}); fix it, or delete it together with the "
                "state dir to start over with new credentials"
            ) from exc

    @classmethod
    def load_or_create(cls, state_dir: Path) -> LocalSecrets:
        """The stored credentials; generated and written (0600) on the first call.

        Users added to ``contracts.names.SERVICES`` since then get a password, and the file is updated.
        """
        existing = cls.load(state_dir)
        current = existing or cls()
        if existing is None or asdict(existing) != cls.load_raw(state_dir):
            current.save(state_dir)
        return current

    @classmethod
    def load_raw(cls, state_dir: Path) -> dict[str, object] | None:
        path = cls.path(state_dir)
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, state_dir: Path) -> Path:
        """Write the file with mode 0600 (created with that mode, never world-readable in between)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = self.path(state_dir)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(self), out, indent=2)
        os.replace(tmp, path)
        path.chmod(0o600)
        return path
