"""How long ``conveyor up`` takes to bring the embedded stack healthy; prints one JSON line.

In a temporary state dir on free ports: the first ``up`` (it creates the secrets, the buckets, the streams
and the repositories), ``down``, then a second ``up`` on the state the first left, and ``down`` again. Each
``up`` returns when every server and service answers its health check (target: the whole stack in < 45 s,
its servers in < 30 s, on the 2-core development machine); the supervisor starts the servers side by side,
then the services side by side, and each part's seconds from its start to healthy are printed too.

Run: ``.venv/bin/python bench/up.py`` (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.local.config import StackSettings
from deploy.local.state import read_json
from tests.servers import free_stack_env


def conveyor(env: dict[str, str], *args: str) -> float:
    """Run ``conveyor ARGS`` as a user would; its duration in seconds (exits on a failure)."""
    print(f"bench/up.py: conveyor {' '.join(args)} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "deploy.local.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"conveyor {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return took


def ready_in(state_dir: Path) -> dict[str, float]:
    """Each part's seconds from its start to healthy, in the order the supervisor started them."""
    state = read_json(StackSettings(state_dir=state_dir).state_file) or {}
    return {part["name"]: part["healthy_after_s"] for part in state.get("parts", [])}


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-up-") as tmp:
        state_dir = Path(tmp) / "state"
        env = free_stack_env(state_dir)
        try:
            first = conveyor(env, "up")
            parts = ready_in(state_dir)
            first_down = conveyor(env, "down")
            second = conveyor(env, "up")
        finally:
            conveyor(env, "down")
    print(
        json.dumps(
            {
                "first_up_s": round(first, 1),
                "down_s": round(first_down, 1),
                "second_up_s": round(second, 1),
                "first_up_ready_in_s": parts,
                "target_up_s": 45,
            }
        )
    )


if __name__ == "__main__":
    main()
