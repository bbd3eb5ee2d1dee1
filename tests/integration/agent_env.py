"""`nichooks agent --foreground` run by a test inside a host namespace, stopped by it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.support.hooks import bin_path, wait_for
from tests.support.netns import Netns
from tests.support.procs import terminate


class AgentProc:
    """The agent as systemd would run it, with the test's settings; its log (stderr,
    one line per action) is kept in a file so a failing test can show it."""

    def __init__(self, ns: Netns, env: dict[str, str], log: Path) -> None:
        self.ns, self.env, self.log_path = ns, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProc:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns.name, bin_path("nichooks"),
                                      "agent", "--foreground"], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        wait_for("the agent to start", lambda: "result=started" in self.log(), timeout=15)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        assert self.proc is not None
        terminate(self.proc, timeout=10)
        self._log.close()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> AgentProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def timed(probe_what: str, probe: object, timeout: float) -> float:
    """Seconds until `probe()` is truthy (AssertionError after `timeout`)."""
    start = time.monotonic()
    wait_for(probe_what, probe, timeout)  # type: ignore[arg-type]
    return time.monotonic() - start
