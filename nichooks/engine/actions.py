"""What a sweep, verify or the agent found or did: one line each for the report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Action:
    nic: str      # "instance tap (key)" or a port / bridge name
    what: str     # undone, rolled-back, retried, orphan-port, orphan-flows, busy, corrupt,
    #               kept, repaired, drift, failed
    detail: str
    ok: bool = True

    def line(self) -> str:
        return f"{self.what}: {self.nic}: {self.detail}"
