"""NICHOOKS_TEST_SERVED=1: every hook a test runs is served by an agent.

The first hook a test runs in a namespace, for a state directory, starts
`nichooks agent --foreground --no-watch` there (serve only: the agent's repairs
would change what the tests expect to find); Netns.delete stops it. The tests are
then run unchanged: tests/integration/test_served_callers.py runs the caller-facing
modules this way, and each of their hooks must be served (the agent's socket must be
there before the hook starts, or the hook would quietly run in-process)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from tests.support.procs import terminate

SERVED = os.environ.get("NICHOOKS_TEST_SERVED") == "1"
HOOKS = ("kvm-ifup", "kvm-ifdown", "vif-ganeti")
# namespace name -> {state dir: agent process}
_AGENTS: dict[str, dict[str, subprocess.Popen[bytes]]] = {}


def is_hook(program: str) -> bool:
    return Path(program).name in HOOKS


def ensure(ns_name: str, env: Mapping[str, str] | None) -> None:
    """An agent serving `ns_name` for the state directory `env` names."""
    if not SERVED or env is None or not env.get("NICHOOKS_STATE_DIR"):
        return
    from tests.support.hooks import bin_path

    state = env["NICHOOKS_STATE_DIR"]
    running = _AGENTS.setdefault(ns_name, {})
    if state in running and running[state].poll() is None:
        return
    sock = Path(state) / "agent.sock"
    log = open(Path(state).parent / f"served-agent-{ns_name}.log", "ab")  # noqa: SIM115
    agent_env = {k: v for k, v in env.items()
                 if k.startswith(("NICHOOKS_", "PYTHON", "GANETI_", "OVS_")) or k in ("PATH", "LC_ALL")}
    running[state] = subprocess.Popen(
        ["ip", "netns", "exec", ns_name, bin_path("nichooks"), "agent", "--foreground", "--no-watch"],
        env=agent_env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    end = time.monotonic() + 30
    while not sock.exists():
        if running[state].poll() is not None or time.monotonic() > end:
            text = Path(log.name).read_text(errors="replace")
            raise AssertionError(f"the serving agent for {state} did not start: {text}")
        time.sleep(0.02)


def stop(ns_name: str) -> None:
    for proc in _AGENTS.pop(ns_name, {}).values():
        terminate(proc, timeout=40)
