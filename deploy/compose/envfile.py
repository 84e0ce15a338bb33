"""A filled-in ``deploy/compose/.env``: ``.env.example`` with a fresh secret in place of every ``change-me``.

``python -m deploy.compose.envfile --output deploy/compose/.env`` writes it (mode 0600, never over an
existing file); without ``--output`` it prints it. Each secret is ``p`` and 48 hex digits, a form every part
reads as it is (nats-server parses its environment's values: it must start with a letter); the gateway's
API keys are a JSON list of one such key. Review the optional settings at the end of the file before
``docker compose up``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

__all__ = ["PLACEHOLDER", "render"]

PLACEHOLDER = "change-me"
EXAMPLE = Path(__file__).with_name(".env.example")


def _secret() -> str:
    return "p" + secrets.token_hex(24)


def render(example: str | None = None) -> str:
    """``.env.example`` (or ``example``) with each placeholder replaced by its own fresh secret."""
    lines = []
    for line in (example if example is not None else EXAMPLE.read_text()).splitlines():
        if not line.startswith("#") and PLACEHOLDER in line:
            key = line.split("=", 1)[0]
            value = json.dumps([_secret()]) if key == "CONVEYOR_GATEWAY_API_KEYS" else _secret()
            line = f"{key}={value}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, help="write here (refused if it exists); default: print")
    args = parser.parse_args(argv)
    text = render()
    if args.output is None:
        sys.stdout.write(text)
        return
    try:
        with args.output.open("x") as handle:  # never replaces the secrets of a running install
            args.output.chmod(0o600)
            handle.write(text)
    except FileExistsError:
        sys.exit(f"{args.output} exists already: its secrets are the install's; delete it to start over")
    print(f"wrote {args.output} (mode 0600); review its optional settings, then `docker compose up`")


if __name__ == "__main__":
    main()
