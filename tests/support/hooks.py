"""Running the installed hooks as Ganeti, QEMU or an operator would, and reading what
they say; polling for what they change."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
# sitecustomize.py there injects NICHOOKS_TEST_FAULT into hook processes (test-only).
FAULT_SEAM = Path(__file__).resolve().parent / "fault_seam"


def bin_path(name: str) -> str:
    """The installed entry point (its shebang names the venv's interpreter)."""
    return str(VENV_BIN / name)


def hook_env(state_dir: Path, conf_dir: Path, **nic: str) -> dict[str, str]:
    """A minimal, explicit environment for running a hook, as Ganeti would build it."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "NICHOOKS_STATE_DIR": str(state_dir),
        "NICHOOKS_CONF_DIR": str(conf_dir),
        "GANETI_RUN_DIR": str(state_dir / "ganeti-run"),
        "PYTHONPATH": str(FAULT_SEAM),
    }
    env.update(nic)
    return env


def one_line(stderr: str) -> str:
    """A failing hook prints exactly one line, starting `nichooks: `."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("nichooks: "), lines[0]
    return lines[0]


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 3.0) -> Any:
    """Poll until `probe` returns something truthy (the kernel updates some state
    asynchronously); AssertionError naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
