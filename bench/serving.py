"""The agent as a benchmark runs it: started in the world's namespace with the
benchmark's settings, its resident memory read from /proc, stopped at the end."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.support.hooks import bin_path
from tests.support.netns import Netns


class Agent:
    def __init__(self, ns: Netns, env: dict[str, str], state: Path) -> None:
        self.socket = state / "agent.sock"
        self.log = (state.parent / "agent.log").open("wb")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, bin_path("nichooks"),
                                      "agent", "--foreground"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        end = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the agent did not start (see {self.log.name})")
            time.sleep(0.05)

    def rss_mib(self) -> float:
        """The agent's and its hook server's resident memory (the calls' own processes
        come and go), in MiB."""
        pids = [self.proc.pid, *children(self.proc.pid)]
        kib = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        kib += int(line.split()[1])
            except OSError:
                pass
        return kib / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
