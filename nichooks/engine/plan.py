"""Plans: ordered steps, each with an undo record that is plain JSON.

A step is a small value object. `prepare` reads what the step is about to change
and returns the undo record (so the journal can hold it before anything happens),
`apply` does it, `verify` reads it back. Undo is looked up by the record's `kind`
in a registry, never through the step object: ifdown rebuilds nothing from the
environment, it replays records (DESIGN §2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nichooks.engine.journal import Record


class Step(Protocol):
    @property
    def kind(self) -> str:
        """The undo kind of the records this step writes."""

    def describe(self) -> str:
        """One line a person reads in `nichooks plan`."""

    def as_data(self) -> dict[str, Any]:
        """The step as data, for `nichooks plan --json` and plan-level tests."""

    def prepare(self, net: Any) -> Record:
        """Read the current state and return the undo record, changing nothing."""

    def apply(self, net: Any) -> dict[str, Any] | None:
        """Make the change; may return facts worth a log field (timings, counts)."""

    def verify(self, net: Any) -> str | None:
        """None if the kernel shows what was applied, else what differs."""


UndoFn = Callable[[Any, dict[str, Any]], None]
PresentFn = Callable[[Any, dict[str, Any]], bool]
UNDO: dict[str, UndoFn] = {}
PRESENT: dict[str, PresentFn] = {}


def undoes(kind: str) -> Callable[[UndoFn], UndoFn]:
    """Register the undo function for records of `kind`."""

    def register(fn: UndoFn) -> UndoFn:
        UNDO[kind] = fn
        return fn

    return register


def checks(kind: str) -> Callable[[PresentFn], PresentFn]:
    """Register the function that tells whether what a record of `kind` undoes is
    still in place (for `nichooks status`, verify and the sweep)."""

    def register(fn: PresentFn) -> PresentFn:
        PRESENT[kind] = fn
        return fn

    return register


def load_backends() -> None:
    """Import every module that registers undo kinds (cheap: none imports a
    netlink or OVSDB library at module level)."""
    import nichooks.host.steps.link
    import nichooks.modes.openvswitch
    import nichooks.modes.routed  # noqa: F401


@dataclass
class Plan:
    mode: str
    nic_label: str
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts found in preflight worth showing
    # routed mode: (uplink, address) to announce after the steps; uplink proxy entries
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
