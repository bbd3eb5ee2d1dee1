"""The agent's resident memory, as a benchmark reads it: the agent and its hook server
(the calls' own processes come and go). The agent itself is started and stopped as
the tests do (tests/integration/agent_env.py)."""

from __future__ import annotations

from pathlib import Path

from tests.support.procs import children


def rss_mib(pid: int) -> float:
    """VmRSS of `pid` and its children, in MiB."""
    kib = 0
    for each in (pid, *children(pid)):
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kib += int(line.split()[1])
        except OSError:
            pass
    return kib / 1024
