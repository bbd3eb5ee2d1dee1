"""A plan: the ordered steps of one plug, and what its mode does once it is applied.

Plans are data: `nichooks plan` prints one, the transaction applies one, tests read
one. Steps are described in engine/records.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nichooks.engine.records import Step


@dataclass
class Plan:
    mode: str
    nic_label: str
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts found in preflight worth showing
    # routed mode: (uplink, address) to announce once applied and read back; uplink proxy entries
    # held back on a migration target until switchover ({"addr", "dev"} each)
    announcements: list[tuple[str, str]] = field(default_factory=list)
    deferred: list[dict[str, str]] = field(default_factory=list)

    def as_data(self) -> list[dict[str, Any]]:
        return [step.as_data() for step in self.steps]

    def text(self) -> str:
        lines = [f"plan for {self.nic_label} ({self.mode}):"]
        lines += [f"  {i}. {step.describe()}" for i, step in enumerate(self.steps, 1)]
        if not self.steps:
            lines.append("  (no built-in steps)")
        lines += [f"  then: announce {addr} on {dev} (gratuitous ARP / unsolicited NA)"
                  for dev, addr in self.announcements]
        lines += [f"  deferred until switchover: proxy {d['addr']} on {d['dev']}, announce it"
                  for d in self.deferred]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
