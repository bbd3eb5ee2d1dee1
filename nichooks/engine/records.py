"""What the engine knows about a record kind: how to undo it, how to tell whether
what it stands for is still in place, and how to rebuild the step that wrote it.

A step is a small value object. `prepare` reads what the step is about to change and
returns the undo record (so the journal holds it before anything happens), `apply`
does it, `verify` reads it back. Undo is looked up by the record's `kind` here, never
through a step object: ifdown rebuilds nothing from the environment, it replays
records. Repair rebuilds each step from its own record (plus the NIC the journal
describes), so rewording a step's description never turns repair off.

The modules that define steps register their kinds when imported. A kind not
registered yet is looked up after the loader has imported what registers it
(modes/registry installs the loader): a hook imports only the modules its journal and
mode need, and still undoes any record a journal holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from nichooks.engine.journal import Record, Status


class Step(Protocol):
    @property
    def kind(self) -> str:
        """The kind of the records this step writes."""

    def describe(self) -> str:
        """One line a person reads in `nichooks plan` and in log lines."""

    def as_data(self) -> dict[str, Any]:
        """The step as data, for `nichooks plan --json` and plan-level tests."""

    def prepare(self, net: Any) -> Record:
        """Read the current state and return the undo record, changing nothing."""

    def apply(self, net: Any) -> dict[str, Any] | None:
        """Make the change; may return facts worth a log field (timings, counts)."""

    def verify(self, net: Any) -> str | None:
        """None if the host shows what was applied, else what differs."""


UndoFn = Callable[[Any, dict[str, Any]], None]
PresentFn = Callable[[Any, dict[str, Any]], bool]
# (the record's undo data, the NIC the journal describes, the host) -> the step that
# wrote the record, or None when there is nothing to re-apply (an entry someone else
# owned, a record of an older shape that lacks what the step needs)
RebuildFn = Callable[[dict[str, Any], Any, Any], "Step | None"]


@dataclass
class Kind:
    undo: UndoFn | None = None
    present: PresentFn | None = None
    rebuild: RebuildFn | None = None
    # Finds its object by the tap's *name*, not its ifindex: a newer plug on the same
    # tap name has one that looks the same, so a stale journal must not undo it.
    by_tap_name: bool = False


KINDS: dict[str, Kind] = {}
_loader: list[Callable[[str], None]] = []  # at most one: imports what registers a kind


def set_loader(load: Callable[[str], None]) -> None:
    _loader[:] = [load]


def lookup(kind: str) -> Kind | None:
    """The registration of `kind`, importing the module that makes it if need be."""
    if kind not in KINDS and _loader:
        _loader[0](kind)
    return KINDS.get(kind)


def _kind(name: str) -> Kind:
    return KINDS.setdefault(name, Kind())


def undoes(kind: str, *, by_tap_name: bool = False) -> Callable[[UndoFn], UndoFn]:
    """Register the undo function for records of `kind`."""

    def register(fn: UndoFn) -> UndoFn:
        entry = _kind(kind)
        entry.undo, entry.by_tap_name = fn, by_tap_name
        return fn

    return register


def checks(kind: str) -> Callable[[PresentFn], PresentFn]:
    """Register the function that tells whether what a record of `kind` undoes is still
    in place (status, verify, the agent's first look)."""

    def register(fn: PresentFn) -> PresentFn:
        _kind(kind).present = fn
        return fn

    return register


def rebuilds(kind: str) -> Callable[[RebuildFn], RebuildFn]:
    """Register the function that rebuilds, from a record of `kind`, the step that wrote it."""

    def register(fn: RebuildFn) -> RebuildFn:
        _kind(kind).rebuild = fn
        return fn

    return register


def undo(net: Any, record: Record) -> None:
    entry = lookup(record.kind)
    if entry is None or entry.undo is None:
        raise ValueError(f"no undo for record kind {record.kind!r}")
    entry.undo(net, record.undo)


def present(net: Any, record: Record) -> bool | None:
    """The one check of a record: True if what it stands for is in place, False if it
    is missing, None if its kind has no check. Raises if the host cannot be read. A
    record whose undo failed is checked too: whether it is still there is what an
    operator reading `nichooks status` wants to know."""
    entry = lookup(record.kind)
    if entry is None or entry.present is None:
        return None
    return bool(entry.present(net, record.undo))


def rebuild(record: Record, nic: Any, net: Any) -> Step | None:
    """The step that wrote `record`, or None if there is nothing to re-apply."""
    entry = lookup(record.kind)
    if record.status == Status.FAILED or entry is None or entry.rebuild is None:
        return None
    return entry.rebuild(record.undo, nic, net)


def by_tap_name(record: Record) -> bool:
    entry = lookup(record.kind)
    return entry is not None and entry.by_tap_name
