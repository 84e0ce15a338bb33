"""Refuse early, with what to do, when this Python cannot run the stack (used by the Makefile)."""

import platform
import sys
import sysconfig

problems = []
if sys.version_info[:2] != (3, 11):
    problems.append(f"Python 3.11 is required, this is {platform.python_version()} ({sys.executable}).")
if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
    problems.append(
        "this Python has no shared libpython, which Triton's Python backend needs: "
        "use a distribution Python or build with --enable-shared (pyenv: "
        "PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install 3.11)."
    )
if platform.system() != "Linux" or platform.machine() != "x86_64":
    problems.append(f"Linux x86-64 is required for the bundled tritonserver, this is {platform.platform()}.")
if problems:
    print("conveyor: cannot set up .venv:\n  - " + "\n  - ".join(problems), file=sys.stderr)
    print("Point the Makefile at another interpreter: make test PYTHON=/path/to/python3.11", file=sys.stderr)
    sys.exit(1)
