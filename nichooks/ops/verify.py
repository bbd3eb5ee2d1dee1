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
from nichooks.errors import InvalidInput, NicHooksError, PlumbingError, cause
from nichooks.host.host import Host
from nichooks.log import HookLog
from nichooks.model import validate
from nichooks.model.nic import Nic
from nichooks.modes import registry
from nichooks.ops.settle import GONE, PRESENT_DEVICE, RENAMED, device_state
from nichooks.settings import Settings


@dataclass
class Check:
    record: Record
    present: bool | None  # None: nothing to check, or the host could not be read
    error: str | None = None


def check_records(net: Host, journal: Journal, *, failed_too: bool = True) -> list[Check]:
    """The journal's records, each checked once by its kind's check."""
    out = []
    for record in journal.records:
        if record.status == Status.FAILED and not failed_too:
            continue
        try:
            out.append(Check(record, kinds.present(net, record)))
        except Exception as exc:
            out.append(Check(record, None, cause(exc)))
    return out


def all_present(net: Host, journal: Journal) -> bool:
    """Every applied record's effect still in place, by the cheap per-record checks:
    what the agent asks first, on every event that might matter."""
    return all(c.present is not False and c.error is None
               for c in check_records(net, journal, failed_too=False))


def journaled_nic(journal: Journal) -> Nic:
    """The NIC the journal's variables describe: what steps rebuilt from records take
    when a record does not carry it (a VLAN, the guest's addresses)."""
    variables = {**journal.variables, "INTERFACE": journal.tap}
    nic = registry.nic_from_variables(variables, tap=journal.tap)
    if journal.key != nic.key and journal.key.startswith(nic.uuid + "-"):
        nic = replace(nic, device=journal.key[len(nic.uuid) + 1:])
    return nic


def preflight(net: Host, settings: Settings, journal: Journal, nic: Nic) -> str | None:
    """What keeps the NIC's mode from planning it on this host now (a bridge replaced by
    another kind of device, a host-wide sysctl reset that the operator manages), or
    None: the host's side of the plug that no record stands for."""
    try:
        registry.get(journal.mode).plan(nic, net, settings)
    except NicHooksError as exc:
        return str(exc)
    return None


@dataclass
class Rebuilt:
    index: int               # of the record in the journal
    step: Step | None        # None: nothing to re-apply (or it could not be rebuilt)
    error: str | None = None


def rebuilt_steps(net: Host, journal: Journal, nic: Nic) -> list[Rebuilt]:
    """For every applied record, the step that wrote it, each on its own: a record that
    cannot be rebuilt does not keep the others from being checked and re-applied."""
    out = []
    for index, record in enumerate(journal.records):
        try:
            step = kinds.rebuild(record, nic, net)  # None for a record whose undo failed
        except Exception as exc:
            out.append(Rebuilt(index, None, f"cannot rebuild {record.step}: {cause(exc)}"))
            continue
        if step is not None:
            out.append(Rebuilt(index, step))
    return out


def drift(net: Host, settings: Settings, journal: Journal) -> list[str]:
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
        nic = journaled_nic(journal)
    except NicHooksError as exc:
        return [f"cannot rebuild the plan to compare: {exc}"]
    problem = preflight(net, settings, journal, nic)
    if problem:
        return [f"cannot rebuild the plan to compare: {problem}"]
    for rebuilt in rebuilt_steps(net, journal, nic):
        mismatch = rebuilt.error or (txn.read_back(rebuilt.step, net) if rebuilt.step else None)
        if mismatch:
            what = rebuilt.step.describe() if rebuilt.step else journal.records[rebuilt.index].step
            found.append(f"{what}: {mismatch}")
    return found


def intact(store: Store, net: Host, key: str, log: HookLog) -> bool:
    """An applied NIC whose device is there and whose every record checks out: what the
    agent asks, without the NIC's locks, before it takes them to repair. A hook busy
    with the NIC (an ifdown right after the plug) is then never made to wait for a
    check that finds nothing to do. A journal is replaced whole (rename), so reading it
    without the lock sees one version or the other, never a mix."""
    journal = txn.load(store, key, log, move_aside=False)
    return isinstance(journal, Journal) and journal.state == State.APPLIED \
        and device_state(net, journal) == PRESENT_DEVICE and all_present(net, journal)


def repair(store: Store, net: Host, settings: Settings, key: str, log: HookLog, *,
           quick: bool = False) -> list[Action]:
    """Re-apply every applied step that no longer reads back, rebuilt from its record;
    the caller holds the NIC's locks. The new record replaces the old one, keeping the
    value from before nichooks first touched it. `quick`: look no further when every
    record's own check passes. A journal that cannot be read is left to the sweep."""
    journal = txn.load(store, key, log, move_aside=False)
    if not isinstance(journal, Journal) or journal.state != State.APPLIED \
            or device_state(net, journal) != PRESENT_DEVICE:
        return []
    if quick and all_present(net, journal):
        return []
    name = f"{journal.instance or '-'} {journal.tap} ({journal.key})"
    log.bind(instance=journal.instance, uuid=journal.key, tap=journal.tap)
    try:
        nic = journaled_nic(journal)
        problem = preflight(net, settings, journal, nic)
    except NicHooksError as exc:
        problem = str(exc)
    if problem:
        if device_state(net, journal) != PRESENT_DEVICE:
            return []  # the device went while we looked: the vanished path takes over
        return [Action(name, "failed", f"cannot rebuild the plan: {problem}", ok=False)]
    actions: list[Action] = []
    for rebuilt in rebuilt_steps(net, journal, nic):
        step = rebuilt.step
        if step is None:
            log.error("repair", step=journal.records[rebuilt.index].step, result="failed",
                      cause=rebuilt.error)
            actions.append(Action(name, "failed", str(rebuilt.error), ok=False))
            continue
        mismatch = txn.read_back(step, net)
        if not mismatch:
            continue
        try:
            txn.write_ahead(store, net, journal, step, at=rebuilt.index)
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
