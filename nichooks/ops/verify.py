"""`nichooks status`, `nichooks verify [--repair]` and the agent's repairs: every
record checked by its kind's one check, and what no longer reads back re-applied by
the step rebuilt from its own record."""

from __future__ import annotations

from dataclasses import dataclass, replace

from nichooks.engine import records as kinds
from nichooks.engine import transaction as txn
from nichooks.engine.actions import Action
from nichooks.engine.journal import Journal, Record, State, Status
from nichooks.engine.records import Step
from nichooks.engine.store import Store
from nichooks.errors import InvalidInput, PlumbingError, cause
from nichooks.host.host import Host
from nichooks.log import HookLog
from nichooks.model import validate
from nichooks.modes import registry
from nichooks.ops.settle import GONE, PRESENT_DEVICE, RENAMED, device_state


@dataclass
class Check:
    record: Record
    present: bool | None  # None: nothing to check, or the host could not be read
    error: str | None = None


def check_records(net: Host, journal: Journal) -> list[Check]:
    """Every record of the journal, checked once."""
    out = []
    for record in journal.records:
        try:
            out.append(Check(record, kinds.present(net, record)))
        except Exception as exc:
            out.append(Check(record, None, cause(exc)))
    return out


def all_present(net: Host, journal: Journal) -> bool:
    """Every record's effect still in place, by the cheap per-record checks: what the
    agent asks first, on every event that might matter."""
    return all(c.present is not False and c.error is None for c in check_records(net, journal))


def rebuilt_steps(net: Host, journal: Journal) -> list[tuple[int, Step]]:
    """(record index, the step that wrote it) for every applied record with something
    to re-apply. The steps take what their records do not carry (a VLAN, the guest's
    addresses) from the NIC the journal's variables describe."""
    variables = {**journal.variables, "INTERFACE": journal.tap}
    nic = registry.nic_from_variables(variables, tap=journal.tap)
    if journal.key != nic.key and journal.key.startswith(nic.uuid + "-"):
        nic = replace(nic, device=journal.key[len(nic.uuid) + 1:])
    out = []
    for index, record in enumerate(journal.records):
        step = kinds.rebuild(record, nic, net)
        if step is not None:
            out.append((index, step))
    return out


def drift(net: Host, journal: Journal) -> list[str]:
    """What differs between the journal and the host, one line each (empty: none)."""
    found: list[str] = []
    if journal.state == State.APPLYING:
        found.append("its ifup has not finished (interrupted, or still running)")
    device = device_state(net, journal)
    if device == GONE:
        return [*found, f"device {journal.tap} (ifindex {journal.ifindex}) is gone; "
                "`nichooks sweep` undoes the rest"]
    if device == RENAMED:
        found.append(f"ifindex {journal.ifindex} is no longer called {journal.tap}")
    for check in check_records(net, journal):
        record = check.record
        if record.status == Status.FAILED:
            found.append(f"undo failed before and is pending a retry: {record.step} ({record.error})")
        elif check.error is not None:
            found.append(f"cannot read back {record.step}: {check.error}")
        elif check.present is False:
            found.append(f"missing: {record.step}")
    if found or journal.state != State.APPLIED:
        return found
    try:
        steps = rebuilt_steps(net, journal)
    except Exception as exc:
        return [f"cannot rebuild the steps to compare: {cause(exc)}"]
    for _index, step in steps:
        mismatch = txn.read_back(step, net)
        if mismatch:
            found.append(f"{step.describe()}: {mismatch}")
    return found


def repair(store: Store, net: Host, key: str, log: HookLog, *,
           quick: bool = False) -> list[Action]:
    """Re-apply every applied step that no longer reads back, rebuilt from its record;
    the caller holds the NIC's locks. The new record replaces the old one, keeping the
    value from before nichooks first touched it. `quick`: look no further when every
    record's own check passes."""
    journal = txn.load(store, key, log)
    if not isinstance(journal, Journal) or journal.state != State.APPLIED \
            or device_state(net, journal) != PRESENT_DEVICE:
        return []
    if quick and all_present(net, journal):
        return []
    name = f"{journal.instance or '-'} {journal.tap} ({journal.key})"
    log.bind(instance=journal.instance, uuid=journal.key, tap=journal.tap)
    try:
        steps = rebuilt_steps(net, journal)
    except Exception as exc:
        if device_state(net, journal) != PRESENT_DEVICE:
            return []  # the device went while we looked: the vanished path takes over
        return [Action(name, "failed", f"cannot rebuild the steps: {cause(exc)}", ok=False)]
    actions: list[Action] = []
    for index, step in steps:
        mismatch = txn.read_back(step, net)
        if not mismatch:
            continue
        try:
            txn.write_ahead(store, net, journal, step, at=index)
            again = step.verify(net)
        except Exception as exc:
            again = cause(exc)
        if again and device_state(net, journal) != PRESENT_DEVICE:
            return actions  # the device went while we worked: the vanished path takes over
        if again:
            log.error("repair", step=step.describe(), result="failed", cause=again)
            actions.append(Action(name, "failed", f"{step.describe()}: {again}", ok=False))
            break  # later steps depend on this one (flows on a port)
        log.info("repair", step=step.describe(), result="ok", was=mismatch)
        actions.append(Action(name, "repaired", f"{step.describe()} (was: {mismatch})"))
    return actions


def select(store: Store, which: str | None) -> list[str]:
    """Journal keys matching a tap name or NIC key (all when `which` is None)."""
    if which is None:
        return store.journal_keys()
    found = [k for k in store.journal_keys() if k == which.lower() or k.startswith(which.lower() + "-")]
    try:
        owner = store.tap_owner(validate.ifname("NIC", which))
    except InvalidInput:
        owner = None
    if owner and owner not in found:
        found.append(owner)
    if not found:
        raise PlumbingError(f"no NIC is journaled under {which!r} (a tap name or NIC UUID)",
                            nic=which, step="verify")
    return sorted(found)
